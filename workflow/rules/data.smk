if config["dataset"]["source"] != "digits":  # a downloaded dataset (cifar10)

    rule fetch_dataset:
        """Download the dataset archive, md5/sha256-verified (login node: a localrule)."""
        localrule: True
        output:
            DATASET_ARCHIVE,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/fetch_dataset.log",
        benchmark:
            f"{BENCH}/fetch_dataset.tsv"
        params:
            url=config["dataset"]["url"],
            checksums=checksum_args(config["dataset"]),
        resources:
            **resources_of("fetch_dataset"),
        shell:
            "ect fetch {params.url} {params.checksums}--out {output} --no-progress > {log} 2>&1"


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
        source=config["dataset"]["source"],
        resolution=config["dataset"]["resolution"],
        archive=lambda wildcards, input: f"--archive {input.archive} " if input.archive else "",
    resources:
        **resources_of("dataset"),
    shell:
        "ect prepare-data --source {params.source} --resolution {params.resolution} {params.archive}--out {output}"
        " > {log} 2>&1"
