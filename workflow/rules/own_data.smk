# Users' own data (cldf.plan_own): the choices of a dataset without masks (given, not made on validation:
# from `selection_from`'s selection.csv or the config's defaults), the labels table checked against the
# masks, pseudo-masks of every case, the nnU-Net v2 hand-off and predictions on new scans (`predict_root`).
# None of these is in the default target:
#   snakemake results/{dataset}/pseudo_masks/manifest.csv | results/{dataset}/nnunet/manifest.csv
#             | results/{dataset}/predict/manifest.csv


MASK_FREE = planned(PLAN.mask_free_pattern)
CLDF_CAM = config["cldf"]["cam"]


rule given_layer_choices:
    """The layers a per-layer CAM of a dataset without masks is fused over: given, not chosen."""
    input:
        source=given_source,
    output:
        CAT.pattern("layer_choices"),
    params:
        settings=lambda w: as_json({"given": PLAN.given_choices("layers", w.cam)}),
        source=source_option,
    wildcard_constraints:
        dataset=MASK_FREE,
    log:
        CAT.log(CAT.pattern("layer_choices")),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf given-choices --settings {params.settings:q} {params.source} --out {output:q} > {log:q} 2>&1"


rule given_tuning:
    """CLDF's decoder of a dataset without masks, trained once with the given settings (no tuning)."""
    input:
        slices=CAT.pattern("slices"),
        features=FEATURES,
        cam=final_cam,
        mg=MEAN_GRADIENT,
        source=given_source,
    output:
        decoder=CAT.pattern("decoder", selection="fused"),
        rows=CAT.pattern("tuning"),
    params:
        settings=lambda w: as_json({**PLAN.tune_settings(), "given": PLAN.given_choices("tuning", w.cam)}),
        source=source_option,
        device=DEVICE,
        seed=SEED,
    wildcard_constraints:
        dataset=MASK_FREE,
    log:
        CAT.log(CAT.pattern("tuning")),
    benchmark:
        CAT.benchmark(CAT.pattern("tuning"))
    threads: TRAIN_THREADS
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf given-tune --slices {input.slices:q} --features {input.features:q} --cam {input.cam:q} --mg {input.mg:q}"
        " --settings {params.settings:q} {params.source} --out {output.decoder:q} --rows-out {output.rows:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule given_unlabelled:
    """The unlabelled protocol's CDM conditioning and gate of a dataset without masks: given, not chosen."""
    input:
        source=given_source,
    output:
        CAT.pattern("unlabelled_choices"),
    params:
        settings=lambda w: as_json({"given": PLAN.given_choices("unlabelled", w.cam)}),
        source=source_option,
    wildcard_constraints:
        dataset=MASK_FREE,
    log:
        CAT.log(CAT.pattern("unlabelled_choices")),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf given-choices --settings {params.settings:q} {params.source} --out {output:q} > {log:q} 2>&1"


ruleorder: given_layer_choices > choose_layers
ruleorder: given_tuning > tune_decoder
ruleorder: given_unlabelled > choose_unlabelled


rule labels_check:
    """Per case, how often the labels table disagrees with the masks (datasets with both)."""
    input:
        CAT.pattern("slices"),
    output:
        CAT.pattern("labels_check"),
    log:
        CAT.log(CAT.pattern("labels_check")),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf labels-check --slices {input:q} --out {output:q} > {log:q} 2>&1"


# The networks CLDF's masks of whole cases read (pseudo-masks, new scans).
CLDF_NETWORKS = {
    "slices": CAT.pattern("slices"),
    "cdm": CAT.pattern("model", model="cdm"),
    "classifier": CAT.pattern("model", model="cam_classifier"),
    "decoder": CAT.pattern("decoder", cam=CLDF_CAM, selection="fused"),
    "tuning": CAT.pattern("tuning", cam=CLDF_CAM),
    "choices": CAT.pattern("unlabelled_choices", cam=CLDF_CAM),
}


rule pseudo_mask_shard:
    """CLDF masks of one shard's cases (labelled slices as labelled, the others under the unlabelled protocol),
    written as NIfTI into pseudo_masks/; features and probabilities computed on the fly."""
    input:
        **CLDF_NETWORKS,
    output:
        temp(CAT.pattern("pseudo_mask_shard")),
    params:
        settings=as_json(PLAN.pseudo_settings()),
        cases=shard_cases,
        folder=nifti_folder("pseudo_mask"),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("pseudo_mask_shard")),
    benchmark:
        CAT.benchmark(CAT.pattern("pseudo_mask_shard"))
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf pseudo-masks --slices {input.slices:q} --cdm {input.cdm:q} --classifier {input.classifier:q}"
        " --decoder {input.decoder:q} --tuning {input.tuning:q} --choices {input.choices:q}"
        " --settings {params.settings:q} --cases {params.cases} --folder {params.folder:q} --out {output:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule pseudo_masks:
    """The manifest of every case's pseudo-mask (case, path, n_slices, n_positive_slices, foreground_voxels)."""
    input:
        parts=lambda w: shard_paths("pseudo_mask_shard", w.dataset),
        check=labels_checked,
    output:
        CAT.pattern("pseudo_masks"),
    log:
        CAT.log(CAT.pattern("pseudo_masks")),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf collect --parts {input.parts:q} --out {output:q} > {log:q} 2>&1"


rule nnunet:
    """An nnU-Net v2 raw dataset (imagesTr, labelsTr = the pseudo-masks, dataset.json) and its manifest."""
    input:
        masks=CAT.pattern("pseudo_masks"),
    output:
        CAT.pattern("nnunet"),
    params:
        dataset=lambda w: as_json(planned(PLAN.dataset, w.dataset)),
        folder=lambda w: planned(PLAN.nnunet_settings, w.dataset)["folder"],
    log:
        CAT.log(CAT.pattern("nnunet")),
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf nnunet --dataset {params.dataset:q} --masks {input.masks:q} --folder {params.folder:q} --out {output:q}"
        " > {log:q} 2>&1"


rule predict_shard:
    """CLDF masks of one shard of new scans (predict_root) under the unlabelled protocol, as NIfTI in predict/."""
    input:
        scans=lambda w: planned(PLAN.predict_inputs, w.dataset, w.shard),
        **CLDF_NETWORKS,
    output:
        temp(CAT.pattern("predict_shard")),
    params:
        dataset=lambda w: as_json(planned(PLAN.predict_dataset, w.dataset)),
        settings=as_json(PLAN.pseudo_settings()),
        cases=lambda w: ",".join(str(i) for i in planned(PLAN.predict_shard_cases, w.dataset, w.shard)),
        folder=nifti_folder("prediction"),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("predict_shard")),
    benchmark:
        CAT.benchmark(CAT.pattern("predict_shard"))
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf predict --dataset {params.dataset:q} --slices {input.slices:q} --cdm {input.cdm:q}"
        " --classifier {input.classifier:q} --decoder {input.decoder:q} --tuning {input.tuning:q}"
        " --choices {input.choices:q} --settings {params.settings:q} --cases {params.cases}"
        " --folder {params.folder:q} --out {output:q} --device {params.device} --seed {params.seed}"
        " --threads {threads} > {log:q} 2>&1"


rule predict:
    """The manifest of the new scans' masks (case, path, foreground_voxels)."""
    input:
        lambda w: [CAT.path("predict_shard", dataset=w.dataset, shard=k) for k in planned(PLAN.predict_shards, w.dataset)],
    output:
        CAT.pattern("predict"),
    log:
        CAT.log(CAT.pattern("predict")),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf collect --parts {input:q} --out {output:q} > {log:q} 2>&1"
