# FID: the feature network, the dataset's reference statistics, FID of each sample set and of every
# tuning snapshot. (Inception, for the paper presets, is a download: see data.smk.)
if SPEC.fid.feature_net.kind == "digits-classifier":

    rule feature_net:
        """The toy FID feature network: a digits classifier trained with a fixed seed."""
        input:
            data=L.dataset,
        output:
            L.feature_net,
        log:
            L.log("feature_net"),
        benchmark:
            L.benchmark("feature_net")
        conda:
            "../envs/ect.yaml"
        threads: threads_of("feature_net")
        resources:
            **resources_of("feature_net"),
        params:
            config=config_files,
            settings=settings("feature_net"),
        shell:
            "exec ect feature-net --config {params.config:q} --data {input.data:q} --out {output:q} > {log:q} 2>&1"


# `ect fid-stats` takes the feature network's settings, not the config files: presets on one dataset share
# its statistics. A large dataset (ImageNet) splits into fid.reference_shards jobs whose moments are merged.
FID_STATS = (
    "exec ect fid-stats --data {input.data:q} --feature-net {input.feature_net:q}{params.dinov2} --kind {params.kind:q}"
    "{params.checksums}{params.dinov2_checksum} --modes {params.modes:q}"
)
FID_STATS_PARAMS = dict(
    kind=SPEC.fid.feature_net.kind,
    checksums=checksum_args(SPEC.fid.feature_net),
    dinov2=dinov2_args,
    dinov2_checksum=optional_args(
        ["--dinov2-sha256", SPEC.fid.dinov2.sha256] if SPEC.fid.dinov2 and SPEC.fid.dinov2.sha256 else []
    ),
    modes=list(SPEC.fid.modes),
)

if L.reference_shards == 1:

    rule fid_reference:
        """Reference statistics (feature mean and covariance) of the dataset."""
        input:
            data=L.dataset,
            feature_net=L.feature_net,
            dinov2=L.dinov2_inputs,
        output:
            L.reference,
        log:
            L.log("fid_reference"),
        benchmark:
            L.benchmark("fid_reference")
        conda:
            "../envs/ect.yaml"
        threads: threads_of("fid_reference")
        resources:
            **resources_of("fid_reference"),
        params:
            **FID_STATS_PARAMS,
        shell:
            f"{FID_STATS} --out {{output:q}} --no-progress > {{log:q}} 2>&1"

else:

    rule fid_reference_shard:
        """Feature moments of one slice of the dataset (a job each, in parallel)."""
        input:
            data=L.dataset,
            feature_net=L.feature_net,
            dinov2=L.dinov2_inputs,
        output:
            L.reference_shard("{shard}"),
        log:
            L.log("fid_reference-{shard}"),
        benchmark:
            L.benchmark("fid_reference-{shard}")
        wildcard_constraints:
            shard=r"\d+",
        conda:
            "../envs/ect.yaml"
        threads: threads_of("fid_reference")
        resources:
            **resources_of("fid_reference"),
        params:
            **FID_STATS_PARAMS,
            shards=L.reference_shards,
        shell:
            f"{FID_STATS} --shard {{wildcards.shard}}/{{params.shards}} --out {{output:q}} --no-progress > {{log:q}} 2>&1"

    rule fid_reference:
        """Reference statistics of the dataset: the shards' moments added up."""
        input:
            [L.reference_shard(i) for i in range(L.reference_shards)],
        output:
            L.reference,
        log:
            L.log("fid_reference"),
        benchmark:
            L.benchmark("fid_reference")
        conda:
            "../envs/ect.yaml"
        resources:
            **resources_of("fid_reference_merge"),
        shell:
            "exec ect fid-stats-merge {input:q} --out {output:q} > {log:q} 2>&1"


if L.reference_check:

    rule reference_check:
        """Our reference statistics against the ones the dataset's authors published (before samples are spent)."""
        input:
            ours=L.reference,
            theirs=L.published_reference,
        output:
            L.reference_check,
        log:
            L.log("reference_check"),
        benchmark:
            L.benchmark("reference_check")
        conda:
            "../envs/ect.yaml"
        resources:
            **resources_of("reference_check"),
        params:
            mode=SPEC.fid.modes[0],
        shell:
            "exec ect reference-check --ours {input.ours:q} --theirs {input.theirs:q} --mode {params.mode:q}"
            " --out {output:q} > {log:q} 2>&1"


if not L.scaling:  # a single run's evaluation (a scaling study scores its points: scaling.smk)

    rule fid:
        """FID of one sample set: min and mean over the config's sample sets."""
        input:
            samples=L.samples("{set}"),
            ref=L.reference,
            feature_net=L.feature_net,
            dinov2=L.dinov2_inputs,
        output:
            L.fid("{set}"),
        log:
            L.log("fid-{set}"),
        benchmark:
            L.benchmark("fid-{set}")
        wildcard_constraints:
            set="|".join(SAMPLE_SETS),
        conda:
            "../envs/ect.yaml"
        threads: threads_of("fid")
        resources:
            **resources_of("fid"),
        params:
            config=config_files,
            settings=settings("fid"),
            dinov2=dinov2_args,
        shell:
            "exec ect fid --config {params.config:q} --samples {input.samples:q} --ref {input.ref:q}"
            " --feature-net {input.feature_net:q}{params.dinov2} --out {output:q} --no-progress > {log:q} 2>&1"

    rule fid_curve:
        """FID against training budget: every EMA snapshot of the tuning run, 1 and 2 steps."""
        input:
            snapshots=L.snapshots,
            ref=L.reference,
            feature_net=L.feature_net,
            dinov2=L.dinov2_inputs,
            labels_source=L.labels_source,
        output:
            curve=L.curve,
            table=L.curve_table,
        log:
            L.log("fid_curve"),
        benchmark:
            L.benchmark("fid_curve")
        conda:
            "../envs/ect.yaml"
        threads: threads_of("fid_curve")
        resources:
            **resources_of("fid_curve"),
        params:
            config=config_files,
            settings=settings("fid_curve"),
            dinov2=dinov2_args,
            dataset=dataset_args,
        shell:
            "exec ect fid-curve --config {params.config:q} --snapshots {input.snapshots:q} --ref {input.ref:q}"
            " --feature-net {input.feature_net:q}{params.dinov2}{params.dataset} --out {output.curve:q} --table {output.table:q}"
            " --no-progress > {log:q} 2>&1"

    # The paper's numbers at an earlier budget, and a compute-budget claim (ect/claims.py judges them).
    if L.claim_kimgs:

        rule fid_snapshot:
            """FID of the tuning snapshot at a budget the paper publishes a number at, with the full protocol."""
            input:
                snapshots=L.snapshots,
                ref=L.reference,
                feature_net=L.feature_net,
                dinov2=L.dinov2_inputs,
                labels_source=L.labels_source,
            output:
                L.snapshot_fid("{kimg}"),
            log:
                L.log("fid_snapshot-{kimg}"),
            benchmark:
                L.benchmark("fid_snapshot-{kimg}")
            wildcard_constraints:
                kimg="|".join(f"{kimg:g}" for kimg in L.claim_kimgs),
            conda:
                "../envs/ect.yaml"
            threads: threads_of("fid_snapshot")
            resources:
                **resources_of("fid_snapshot"),
            params:
                config=config_files,
                settings=settings("fid_snapshot"),
                dinov2=dinov2_args,
                dataset=dataset_args,
            shell:
                "exec ect fid-snapshot --config {params.config:q} --snapshots {input.snapshots:q}"
                " --kimg {wildcards.kimg:q} --ref {input.ref:q} --feature-net {input.feature_net:q}{params.dinov2}{params.dataset}"
                " --out {output:q} --no-progress > {log:q} 2>&1"

    if L.judges_budget:

        rule fid_budget:
            """A compute-budget claim: the snapshots near the FID crossing scored with the full protocol, judged."""
            input:
                curve=L.curve,
                snapshots=L.snapshots,
                ref=L.reference,
                feature_net=L.feature_net,
                dinov2=L.dinov2_inputs,
                labels_source=L.labels_source,
            output:
                L.budget_fid,
            log:
                L.log("fid_budget"),
            benchmark:
                L.benchmark("fid_budget")
            conda:
                "../envs/ect.yaml"
            threads: threads_of("fid_budget")
            resources:
                **resources_of("fid_budget"),
            params:
                config=config_files,
                settings=settings("fid_budget"),
                dinov2=dinov2_args,
                dataset=dataset_args,
            shell:
                "exec ect fid-budget --config {params.config:q} --curve {input.curve:q} --snapshots {input.snapshots:q}"
                " --ref {input.ref:q} --feature-net {input.feature_net:q}{params.dinov2}{params.dataset} --out {output:q}"
                " --no-progress > {log:q} 2>&1"


if L.emas_fid:

    rule fid_emas:
        """Every EMA of the tuning run at its end (classic, each power-function one), scored with the full protocol."""
        input:
            emas=L.emas,
            ref=L.reference,
            feature_net=L.feature_net,
            dinov2=L.dinov2_inputs,
            labels_source=L.labels_source,
        output:
            L.emas_fid,
        log:
            L.log("fid_emas"),
        benchmark:
            L.benchmark("fid_emas")
        conda:
            "../envs/ect.yaml"
        threads: threads_of("fid_emas")
        resources:
            **resources_of("fid_emas"),
        params:
            config=config_files,
            settings=settings("fid_emas"),
            dinov2=dinov2_args,
            dataset=dataset_args,
        shell:
            "exec ect fid-emas --config {params.config:q} --emas {input.emas:q} --ref {input.ref:q}"
            " --feature-net {input.feature_net:q}{params.dinov2}{params.dataset} --out {output:q} --no-progress"
            " > {log:q} 2>&1"
