# A scaling study (a config with a `scaling` section): each size's snapshots at the budget points are
# scored (a job per point), gathered into one table and fitted with power laws, across sizes (the
# compute frontier) and per size. `snakemake scaling` runs it; the report shows the fits.
BUDGETS = {f"{kimg:g}": kimg for kimg in L.scaling.budgets_kimg}
FITS = L.scaling_fit_names(SPEC.fid.curve_steps)


rule scaling_point:
    """One point: FID sets of a size's tuning snapshot at a budget (tuning FLOPs from its meta)."""
    input:
        snapshots=L.snapshots,
        ref=L.reference,
        feature_net=L.feature_net,
        dinov2=L.dinov2_inputs,
        labels_source=L.labels_source,
    output:
        L.scaling_point("{size}", "{kimg}"),
    log:
        L.log("scaling_point-{size}-{kimg}"),
    benchmark:
        L.benchmark("scaling_point-{size}-{kimg}")
    wildcard_constraints:
        size="|".join(L.scaling.sizes),
        kimg="|".join(BUDGETS),
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
        "exec ect scaling-point --config {params.config:q} --snapshots {input.snapshots:q} --size {wildcards.size:q}"
        " --kimg {wildcards.kimg:q} --ref {input.ref:q} --feature-net {input.feature_net:q}{params.dinov2}{params.dataset}"
        " --out {output:q} --no-progress > {log:q} 2>&1"


rule scaling_points:
    """Every point as one table: compute, FID per set, size, steps."""
    input:
        [L.scaling_point(size, kimg) for size in L.scaling.sizes for kimg in BUDGETS],
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
    """A power law: at N steps across sizes (the compute frontier), or for one size."""
    input:
        L.scaling_points,
    output:
        L.scaling_fit("{fit}"),
    log:
        L.log("scaling_fit-{fit}"),
    benchmark:
        L.benchmark("scaling_fit-{fit}")
    wildcard_constraints:
        fit="|".join(FITS),
    conda:
        "../envs/ect.yaml"
    resources:
        **resources_of("scaling_fit"),
    params:
        selection=lambda wildcards: scaling_fit_args(wildcards.fit),
    shell:
        "exec ect scaling-fit {input:q} --out {output:q}{params.selection} > {log:q} 2>&1"


rule scaling:
    """The whole study: every point, every fit, the report."""
    input:
        L.report_dir,
