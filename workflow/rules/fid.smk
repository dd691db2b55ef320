if config["fid"]["feature_net"]["kind"] == "digits-classifier":  # toy: trained here

    rule feature_net:
        """The toy FID feature network: a digits classifier trained with a fixed seed."""
        input:
            data=DATASET,
        output:
            FEATURE_NET,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/feature_net.log",
        benchmark:
            f"{BENCH}/feature_net.tsv"
        params:
            config=config_files,
            settings=config["fid"]["feature_net"],
        threads: threads_of("feature_net")
        resources:
            **resources_of("feature_net"),
        shell:
            "ect feature-net --config {params.config} --data {input.data} --out {output} > {log} 2>&1"

else:  # Inception: clean-fid's TorchScript file, fetched into resources/

    rule fetch_feature_net:
        """Download the FID feature network (Inception TorchScript), checksum-verified (login node)."""
        localrule: True
        output:
            FEATURE_NET,
        conda:
            "../envs/ect.yaml"
        log:
            f"{LOGS}/fetch_feature_net.log",
        benchmark:
            f"{BENCH}/fetch_feature_net.tsv"
        params:
            url=config["fid"]["feature_net"]["url"],
            checksums=checksum_args(config["fid"]["feature_net"]),
        resources:
            **resources_of("fetch_feature_net"),
        shell:
            "ect fetch {params.url} {params.checksums}--out {output} --no-progress > {log} 2>&1"


rule fid_reference:
    """Reference statistics (feature mean and covariance) of the dataset."""
    input:
        data=DATASET,
        feature_net=FEATURE_NET,
    output:
        REFERENCE,
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/fid_reference.log",
    benchmark:
        f"{BENCH}/fid_reference.tsv"
    params:  # the feature network's settings, not the config files: presets on one dataset share REFERENCE
        kind=config["fid"]["feature_net"]["kind"],
        checksums=checksum_args(config["fid"]["feature_net"]),
        modes=" ".join(config["fid"]["modes"]),
    threads: threads_of("fid_reference")
    resources:
        **resources_of("fid_reference"),
    shell:
        "ect fid-stats --data {input.data} --feature-net {input.feature_net} --kind {params.kind} {params.checksums}"
        "--modes {params.modes} --out {output} --no-progress > {log} 2>&1"


rule fid:
    """FID of one sample set: min and mean over the config's sample sets."""
    input:
        samples=f"{RESULTS}/samples/{{set}}.npz",
        ref=REFERENCE,
        feature_net=FEATURE_NET,
    output:
        f"{RESULTS}/fid/{{set}}.json",
    wildcard_constraints:
        set="|".join(SAMPLE_SETS),
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/fid-{{set}}.log",
    benchmark:
        f"{BENCH}/fid-{{set}}.tsv"
    params:
        config=config_files,
        sets=config["sample"]["sets"],
        modes=config["fid"]["modes"],
    threads: threads_of("fid")
    resources:
        **resources_of("fid"),
    shell:
        "ect fid --config {params.config} --samples {input.samples} --ref {input.ref} --feature-net {input.feature_net}"
        " --out {output} --no-progress > {log} 2>&1"


rule fid_curve:
    """FID against training budget: every EMA snapshot of the tuning run, 1 and 2 steps."""
    input:
        snapshots=f"{RESULTS}/snapshots",
        ref=REFERENCE,
        feature_net=FEATURE_NET,
    output:
        f"{RESULTS}/fid/curve.json",
    conda:
        "../envs/ect.yaml"
    log:
        f"{LOGS}/fid_curve.log",
    benchmark:
        f"{BENCH}/fid_curve.tsv"
    params:
        config=config_files,
        settings=config["fid"],
        t_mid=config["sample"]["t_mid"],  # the 2-step curve samples with it
    threads: threads_of("fid_curve")
    resources:
        **resources_of("fid_curve"),
    shell:
        "ect fid-curve --config {params.config} --snapshots {input.snapshots} --ref {input.ref}"
        " --feature-net {input.feature_net} --out {output} --no-progress > {log} 2>&1"
