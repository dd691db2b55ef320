# The teacher: trained here (toy) or a pretrained EDM pickle converted to our checkpoint; in a scaling study
# one per size ({size}), but a size whose run another preset makes (scaling.reuse: scaling.smk).


PRETRAIN_SHELL = (
    "exec ect pretrain --config {params.config:q}{params.size} --data {input.data:q} --state-dir {params.state:q}"
    " --out {output.teacher:q} --train-log {output.train_log:q} --no-progress > {log:q} 2>&1"
)
CONVERT_SHELL = "exec ect convert-edm {input:q} {output:q}{params.checksums} > {log:q} 2>&1"


if SPEC.teacher.source == "pretrain":

    rule pretrain:
        """Toy stand-in for the EDM download: train a small EDM teacher from scratch."""
        input:
            data=L.dataset,
        output:
            teacher=L.teacher,
            train_log=L.pretrain_log,
        log:
            L.size_log("pretrain"),
        benchmark:
            L.size_benchmark("pretrain")
        wildcard_constraints:
            **size_constraint(),
        conda:
            "../envs/ect.yaml"
        threads: threads_of("pretrain")
        resources:
            **resources_of("pretrain"),
        params:
            config=config_files,
            settings=settings("pretrain"),
            state=per_job(L.state("pretrain")),  # resumable state: not an output, so a retry resumes
            size=size_args,
        shell:
            PRETRAIN_SHELL

else:

    rule teacher:
        """Convert the EDM or EDM2 pickle (a scaling study's: each size's) to our checkpoint without executing
        anything from it."""
        input:
            lambda wildcards: L.teacher_pickle_of(wildcards.get("size")),
        output:
            L.teacher,
        log:
            L.size_log("teacher"),
        benchmark:
            L.size_benchmark("teacher")
        wildcard_constraints:
            **size_constraint(),
        conda:
            "../envs/ect.yaml"
        resources:
            **resources_of("teacher"),
        params:
            checksums=lambda wildcards: checksum_args(L.teacher_entry_of(wildcards.get("size"), SPEC.teacher)),
        shell:
            CONVERT_SHELL
