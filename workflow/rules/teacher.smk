rule pretrain:
    """Toy stand-in for the EDM download: train a small EDM teacher from scratch."""
    input:
        data=DATASET,
    output:
        teacher=TEACHER,
        train_log=f"{RESULTS}/pretrain-log.jsonl",
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{BENCH}/pretrain.tsv"
    params:
        config=CONFIG,
        settings=config["pretrain"],
        state=f"{RESULTS}/state/pretrain",  # resumable state: not an output, so a retry resumes
    threads: threads_of("pretrain")
    resources:
        **resources_of("pretrain"),
    shell:
        "ect pretrain --config {params.config} --data {input.data} --state-dir {params.state} --out {output.teacher}"
        " --train-log {output.train_log} --no-progress > {log} 2>&1"
