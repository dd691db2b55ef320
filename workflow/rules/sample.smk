rule sample:
    """One sample set: ECT 1-/2-step, the teacher as a 1-step model, or the teacher's Heun sampler."""
    input:
        checkpoint=checkpoint_of,
    output:
        samples=f"{RESULTS}/samples/{{set}}.npz",
        grid=f"{RESULTS}/samples/{{set}}.png",
    wildcard_constraints:
        set="|".join(SAMPLE_SETS),
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/sample-{{set}}.log",
    benchmark:
        f"{BENCH}/sample-{{set}}.tsv"
    params:
        config=config_files,
        settings=config["sample"],
    threads: threads_of("sample")
    resources:
        **resources_of("sample"),
    shell:
        "ect sample --config {params.config} --set {wildcards.set} --checkpoint {input.checkpoint} --out {output.samples}"
        " --grid {output.grid} --no-progress > {log} 2>&1"
