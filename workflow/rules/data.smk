rule dataset:
    """The config's dataset in our format (uint8 images + labels, content-hashed)."""
    output:
        DATASET,
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/dataset.log",
    benchmark:
        f"{BENCH}/dataset.tsv"
    params:
        config=CONFIG,
        dataset=config["dataset"],
    resources:
        **resources_of("dataset"),
    shell:
        "ect prepare-data --config {params.config} --out {output} > {log} 2>&1"
