rule report:
    """The HTML report: FID against the paper, sample grids, curves, protocol, provenance."""
    input:
        fid=expand(f"{RESULTS}/fid/{{set}}.json", set=SAMPLE_SETS),
        grids=expand(f"{RESULTS}/samples/{{set}}.png", set=SAMPLE_SETS),
        curve=f"{RESULTS}/fid/curve.json",
        logs=([PRETRAIN_LOG] if config["teacher"]["source"] == "pretrain" else []) + [f"{RESULTS}/train-log.jsonl"],
        checkpoints=[TEACHER, TUNED],
        data=DATASET,
    output:
        REPORT,
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    params:
        results=lambda wildcards, input: os.path.dirname(input.checkpoints[0]),
        # the report shows the config files and the merged config: any change rebuilds it (seconds)
        config=CONFIG,
        settings=config,
    resources:
        **resources_of("report"),
    shell:
        "ect report --config {params.config} --results {params.results} --data {input.data} --out {output} > {log} 2>&1"
