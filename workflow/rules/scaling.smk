# A scaling study (a config with a `scaling` section): the snapshots of each of its runs at their budget
# points are scored (a job per point), gathered into one table and fitted with power laws: across sizes
# (the compute frontier), per size (prefix points, batch-grown runs), across sizes at one budget.
# `snakemake scaling` runs it; the report shows the fits. A size may reuse another preset's run
# (scaling.reuse): its teacher and tuning jobs are that preset's, the same commands on the same files.
POINTS = {(model, f"{kimg:g}"): kimg for model in L.scaling.models for kimg in L.scaling.budgets_of(model)}
FITS = L.scaling_fits(SPEC.fid.curve_steps)


rule scaling_point:
    """One point: FID sets of a run's snapshot at a budget (tuning FLOPs from its meta)."""
    input:
        snapshots=lambda wildcards: RunLayout(SPEC, wildcards.model).snapshots,
        ref=L.reference,
        feature_net=L.feature_net,
        dinov2=L.dinov2_inputs,
        labels_source=L.labels_source,
    output:
        L.scaling_point("{model}", "{kimg}"),
    log:
        L.log("scaling_point-{model}-{kimg}"),
    benchmark:
        L.benchmark("scaling_point-{model}-{kimg}")
    wildcard_constraints:
        model="|".join(map(re.escape, L.scaling.models)),
        kimg="|".join(sorted({re.escape(kimg) for _, kimg in POINTS})),
    conda:
        "../envs/ect.yaml"
    threads: threads_of("scaling_point")
    resources:
        **resources_of("scaling_point"),
    params:
        config=config_files,
        settings=settings("scaling_point"),
        dinov2=dinov2_args,
        dataset=dataset_args,
    shell:
        "exec ect scaling-point --config {params.config:q} --snapshots {input.snapshots:q} --model {wildcards.model:q}"
        " --kimg {wildcards.kimg:q} --ref {input.ref:q} --feature-net {input.feature_net:q}{params.dinov2}{params.dataset}"
        " --out {output:q} --no-progress > {log:q} 2>&1"


rule scaling_points:
    """Every point as one table: a row per FID set of each metric (compute, size, run, design, steps)."""
    input:
        [L.scaling_point(model, kimg) for model, kimg in POINTS],
    output:
        L.scaling_points,
    log:
        L.log("scaling_points"),
    benchmark:
        L.benchmark("scaling_points")
    conda:
        "../envs/ect.yaml"
    resources:
        **resources_of("scaling_points"),
    shell:
        "exec ect scaling-points {output:q} {input:q} > {log:q} 2>&1"


rule scaling_fit:
    """Power laws of FID (and FD_DINOv2): across sizes, for one size, or across sizes at one budget."""
    input:
        L.scaling_points,
    output:
        L.scaling_fit("{fit}"),
    log:
        L.log("scaling_fit-{fit}"),
    benchmark:
        L.benchmark("scaling_fit-{fit}")
    wildcard_constraints:
        fit="|".join(map(re.escape, FITS)),
    conda:
        "../envs/ect.yaml"
    resources:
        **resources_of("scaling_fit"),
    params:
        selection=lambda wildcards: optional_args(FITS[wildcards.fit]),
    shell:
        "exec ect scaling-fit {input:q} --out {output:q}{params.selection} > {log:q} 2>&1"


rule scaling:
    """The whole study: every point, every fit, the report."""
    input:
        L.report_dir,


# A reused run: the teacher and tuning jobs of its own preset, with its config files and settings, so that
# either workflow makes the same files with the same commands (and DVC writes the stage once).
for reused_size, reused_spec in L.reused.items():
    reused = RunLayout(reused_spec)
    reused_files = [f"config/{SPEC.scaling.reuse[reused_size]}.yaml"]  # as its own workflow hands it on

    if SPEC.teacher.source == "pretrain":

        rule:
            name:
                f"pretrain_reused_{reused_size}"
            input:
                data=L.dataset,
            output:
                teacher=reused.teacher,
                train_log=reused.pretrain_log,
            log:
                reused.size_log("pretrain"),
            benchmark:
                reused.size_benchmark("pretrain")
            conda:
                "../envs/ect.yaml"
            threads: threads_of("pretrain", reused_spec)
            resources:
                **resources_of("pretrain", reused_spec),
            params:
                config=lambda wildcards, input, files=reused_files: files,
                settings=step_values(reused_spec, "pretrain"),
                state=reused.state("pretrain"),
                size="",
            shell:
                PRETRAIN_SHELL

    else:

        rule:
            name:
                f"teacher_reused_{reused_size}"
            input:
                L.teacher_pickle,
            output:
                reused.teacher,
            log:
                reused.size_log("teacher"),
            benchmark:
                reused.size_benchmark("teacher")
            conda:
                "../envs/ect.yaml"
            resources:
                **resources_of("teacher", reused_spec),
            params:
                checksums=checksum_args(SPEC.teacher),
            shell:
                CONVERT_SHELL

    rule:
        name:
            f"tune_reused_{reused_size}"
        input:
            data=L.dataset,
            teacher=reused.teacher,
        output:
            **tune_outputs(reused, reused_spec),
        log:
            reused.model_log("tune"),
        benchmark:
            reused.model_benchmark("tune")
        conda:
            "../envs/ect.yaml"
        threads: threads_of("tune", reused_spec)
        resources:
            **resources_of("tune", reused_spec),
            slurm_extra="--signal=USR1@300 --requeue",
        params:
            config=lambda wildcards, input, files=reused_files: files,
            settings=step_values(reused_spec, "tune"),
            state=reused.state("tune"),
            model="",
            emas=emas_args,
            launcher=tune_launcher(reused_spec),
        shell:
            TUNE_SHELL
