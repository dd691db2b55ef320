rule tune:
    """ECT: tune the teacher into a consistency model; EMA snapshots for the FID curve."""
    input:
        data=DATASET,
        teacher=TEACHER,
    output:
        tuned=TUNED,
        snapshots=directory(f"{RESULTS}/snapshots"),
        train_log=f"{RESULTS}/train-log.jsonl",
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/tune.log",
    benchmark:
        f"{BENCH}/tune.tsv"
    params:
        config=CONFIG,
        settings=config["tune"],
        state=f"{RESULTS}/state/tune",  # resumable state: not an output, so a retry resumes
    threads: threads_of("tune")
    resources:
        **resources_of("tune"),
    shell:
        "ect tune --config {params.config} --data {input.data} --teacher {input.teacher} --state-dir {params.state}"
        " --out {output.tuned} --snapshots {output.snapshots} --train-log {output.train_log}"
        " --no-progress > {log} 2>&1"
