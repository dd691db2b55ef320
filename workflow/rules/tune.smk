# ECT tuning: one run, or in a scaling study one per run of the study ({model}: a size, a seed repeat or a
# batch-grown run), each from its size's teacher.
TUNE_SHELL = (
    "exec {params.launcher:q} tune --config {params.config:q}{params.model} --data {input.data:q}"
    " --teacher {input.teacher:q} --state-dir {params.state:q} --out {output.tuned:q}"
    " --snapshots {output.snapshots:q}{params.emas} --train-log {output.train_log:q} --no-progress > {log:q} 2>&1"
)


rule tune:
    """ECT: tune the teacher into a consistency model; EMA snapshots for the FID curve."""
    input:
        data=L.dataset,
        teacher=lambda wildcards: RunLayout(SPEC, wildcards.get("model", "{model}")).teacher,
    output:
        **tune_outputs(L, SPEC),
    log:
        L.model_log("tune"),
    benchmark:
        L.model_benchmark("tune")
    wildcard_constraints:
        **({"model": "|".join(map(re.escape, L.trained_models)) or "-"} if SPEC.scaling else {}),
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
        model=model_args,  # a scaling study's run: its size's overrides, its seed, batch and length
        emas=emas_args,
        launcher=tune_launcher(SPEC),
    shell:
        TUNE_SHELL
