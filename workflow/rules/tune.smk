rule tune:
    """ECT: tune the teacher into a consistency model; EMA snapshots for the FID curve."""
    input:
        data=L.dataset,
        teacher=L.teacher,
    output:
        tuned=L.tuned,
        snapshots=directory(L.snapshots),
        train_log=L.train_log,
    log:
        L.model_log("tune"),
    benchmark:
        L.model_benchmark("tune")
    conda:
        "../envs/ect.yaml"
    threads: threads_of("tune")
    resources:
        **resources_of("tune"),
        # SLURM: SIGUSR1 to the job's processes 5 minutes before the time limit (the trainer saves
        # its state and exits 75), and requeue after a preemption or node failure. A job that ends
        # at its limit fails; Snakemake's retries (slurm profile) resubmit it and training resumes.
        slurm_extra="--signal=USR1@300 --requeue",
    params:
        config=config_files,
        settings=settings("tune"),
        state=per_job(L.state("tune")),  # resumable state: not an output, so a retry resumes
        size=size_args,  # a scaling study's size: its scaling.tune overrides
        # one process per GPU on this node (torchrun); a single process without torchrun otherwise
        launcher=(
            ["torchrun", "--standalone", f"--nproc_per_node={gpus_of('tune')}", "-m", "ect.cli"]
            if gpus_of("tune") > 1
            else ["ect"]
        ),
    shell:
        "exec {params.launcher:q} tune --config {params.config:q}{params.size} --data {input.data:q} --teacher {input.teacher:q}"
        " --state-dir {params.state:q} --out {output.tuned:q} --snapshots {output.snapshots:q}"
        " --train-log {output.train_log:q} --no-progress > {log:q} 2>&1"
