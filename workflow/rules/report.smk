rule report:
    """The HTML report: FID against the paper, sample grids, curves, protocol, provenance."""
    input:
        fid=[L.fid(s) for s in SAMPLE_SETS],
        grids=[L.grid(s) for s in SAMPLE_SETS],
        curve=L.curve,
        logs=([L.pretrain_log] if config["teacher"]["source"] == "pretrain" else []) + [L.train_log],
        checkpoints=[L.teacher, L.tuned],
        data=L.dataset,
    output:
        directory(L.report_dir),
    log:
        L.log("report"),
    benchmark:
        L.benchmark("report")
    conda:
        "../envs/ect.yaml"
    resources:
        **resources_of("report"),
    params:
        # the report shows the config files and the merged config: any change rebuilds it (seconds)
        config=CONFIG_FILES,
        settings=settings("report"),
    shell:
        "exec ect report --config {params.config:q} --out {output:q} > {log:q} 2>&1"
