rule sample:
    """One sample set: ECT 1-/2-step, the teacher as a 1-step model, or the teacher's Heun sampler."""
    input:
        checkpoint=checkpoint_of,
        labels_source=L.labels_source,
    output:
        samples=L.samples("{set}"),
        grid=L.grid("{set}"),
    log:
        L.log("sample-{set}"),
    benchmark:
        L.benchmark("sample-{set}")
    wildcard_constraints:
        set="|".join(SAMPLE_SETS),
    conda:
        "../envs/ect.yaml"
    threads: threads_of("sample")
    resources:
        **resources_of("sample"),
    params:
        config=config_files,
        settings=settings("sample"),
        dataset=dataset_args,
    shell:
        "exec ect sample --config {params.config:q} --set {wildcards.set:q} --checkpoint {input.checkpoint:q}"
        "{params.dataset} --out {output.samples:q} --grid {output.grid:q} --no-progress > {log:q} 2>&1"
