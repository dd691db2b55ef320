rule report:
    """The HTML report: FID against the paper, sample grids, curves, protocol, provenance."""
    input:
        unpack(report_inputs),
    output:
        report=directory(L.report_dir),
        claims=L.claims,
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
        "exec ect report --config {params.config:q} --out {output.report:q} --claims {output.claims:q} > {log:q} 2>&1"
