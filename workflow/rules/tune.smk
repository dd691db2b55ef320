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
        config=config_files,
        settings=training_settings("tune"),
        state=f"{RESULTS}/state/tune",  # resumable state: not an output, so a retry resumes
        # one process per GPU on this node (torchrun); a single process without torchrun otherwise
        launcher=(f"torchrun --standalone --nproc_per_node={gpus_of('tune')} -m ect.cli"
                  if gpus_of("tune") > 1 else "ect"),
    threads: threads_of("tune")
    resources:
        **resources_of("tune"),
        # SLURM: SIGUSR1 to the job's processes 5 minutes before the time limit (the trainer saves
        # its state and exits 75), and requeue after a preemption or node failure. A job that ends
        # at its limit fails; Snakemake's retries (slurm profile) resubmit it and training resumes.
        slurm_extra="--signal=USR1@300 --requeue",
    shell:
        "{params.launcher} tune --config {params.config} --data {input.data} --teacher {input.teacher} --state-dir {params.state}"
        " --out {output.tuned} --snapshots {output.snapshots} --train-log {output.train_log}"
        " --no-progress > {log} 2>&1"
