if config["teacher"]["source"] == "pretrain":  # toy: a small teacher trained here

    rule pretrain:
        """Toy stand-in for the EDM download: train a small EDM teacher from scratch."""
        input:
            data=DATASET,
        output:
            teacher=TEACHER,
            train_log=PRETRAIN_LOG,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/pretrain.log",
        benchmark:
            f"{BENCH}/pretrain.tsv"
        params:
            config=config_files,
            settings=training_settings("pretrain"),
            state=f"{RESULTS}/state/pretrain",  # resumable state: not an output, so a retry resumes
        threads: threads_of("pretrain")
        resources:
            **resources_of("pretrain"),
        shell:
            "ect pretrain --config {params.config} --data {input.data} --state-dir {params.state}"
            " --out {output.teacher} --train-log {output.train_log} --no-progress > {log} 2>&1"

else:  # a pretrained EDM pickle

    rule fetch_teacher:
        """Download the pretrained EDM pickle, sha256-verified (login node: a localrule)."""
        localrule: True
        output:
            TEACHER_PICKLE,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/fetch_teacher.log",
        benchmark:
            f"{BENCH}/fetch_teacher.tsv"
        params:
            url=config["teacher"]["url"],
            checksums=checksum_args(config["teacher"]),
        resources:
            **resources_of("fetch_teacher"),
        shell:
            "ect fetch {params.url} {params.checksums}--out {output} --no-progress > {log} 2>&1"

    rule teacher:
        """Convert the EDM pickle to our checkpoint without executing anything from it."""
        input:
            TEACHER_PICKLE,
        output:
            TEACHER,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/teacher.log",
        benchmark:
            f"{BENCH}/teacher.tsv"
        params:
            sha256=config["teacher"]["sha256"],
        resources:
            **resources_of("teacher"),
        shell:
            "ect convert-edm {input} {output} --sha256 {params.sha256} > {log} 2>&1"
