# Downloads (login node: localrules) and the dataset in our format.
for fetch_rule, (download, entry) in L.downloads.items():

    rule:
        """Download a file of the preset, checksum-verified (login node: a localrule)."""
        name:
            fetch_rule
        output:
            file=download,
            record=L.fetch_record(download),
        log:
            L.log(fetch_rule),
        benchmark:
            L.benchmark(fetch_rule)
        localrule: True
        conda:
            "../envs/ect.yaml"
        resources:
            **resources_of(fetch_rule),
        params:
            url=entry.url,
            checks=fetch_args(entry),
        shell:
            "exec ect fetch {params.url:q}{params.checks} --out {output.file:q} --provenance {output.record:q}"
            " --no-progress > {log:q} 2>&1"


rule dataset:
    """The config's dataset in our format (uint8 images + labels, content-hashed)."""
    input:
        archive=[L.dataset_archive] if L.dataset_archive else [],
    output:
        L.dataset,
    log:
        L.log("dataset"),
    benchmark:
        L.benchmark("dataset")
    conda:
        "../envs/ect.yaml"
    resources:
        **resources_of("dataset"),
    params:
        source=SPEC.dataset.source,
        resolution=SPEC.dataset.resolution,
        # a download (cifar10), or a local copy the user points at (imagenet's dataset.path: not an input,
        # so a dry run plans without it; prepare-data names it if it is missing)
        archive=lambda wildcards, input: optional_args(
            ["--archive", input.archive or SPEC.dataset.path] if input.archive or SPEC.dataset.path else []
        ),
        expect_count=optional_args(
            ["--expect-count", SPEC.dataset.expected_count] if SPEC.dataset.expected_count else []
        ),
    shell:
        "exec ect prepare-data --source {params.source:q} --resolution {params.resolution:q}{params.archive}"
        "{params.expect_count} --out {output:q} --no-progress > {log:q} 2>&1"
