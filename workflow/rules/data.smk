if config["dataset"]["source"] != "digits":  # a downloaded dataset (cifar10)

    rule download_dataset:
        """Download the dataset archive, md5/sha256-verified (login node: a localrule)."""
        localrule: True
        output:
            DATASET_ARCHIVE,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/download_dataset.log",
        benchmark:
            f"{BENCH}/download_dataset.tsv"
        params:
            config=CONFIG,
        resources:
            **resources_of("download_dataset"),
        shell:
            "ect fetch --config {params.config} --item dataset --out {output} --no-progress > {log} 2>&1"


rule dataset:
    """The config's dataset in our format (uint8 images + labels, content-hashed)."""
    input:
        archive=[DATASET_ARCHIVE] if DATASET_ARCHIVE else [],
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
        archive=lambda wildcards, input: f"--archive {input.archive} " if input.archive else "",
        dataset=config["dataset"],
    resources:
        **resources_of("dataset"),
    shell:
        "ect prepare-data --config {params.config} {params.archive}--out {output} > {log} 2>&1"
