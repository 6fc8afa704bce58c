# CLDF proper: fused pixel selection + contrastive pixel decoder, K-means masks; the thresholded
# baselines and the fully supervised upper bound; masks written back as NIfTI.

# Where each selection mode's decoder and masks live under results/{dataset}/cldf/. The MG-only ablation
# does not depend on the CAM, so it sits outside the CAM's directory and survives a switch of cldf.cam.
SELECTION_DIRS = {"fused": "{cam}/", "cam": "{cam}/ablation-cam/", "mg": "ablation-mg/"}
PROBS = f"{R}/{{dataset}}/classifier_probs.zarr"


def decoder_settings(mode):
    cl = config["cldf"]
    return as_json({"selection": {**cl["selection"], "mode": mode}, "decoder": cl["decoder"]})


MAP_STORES = {"cam": f"{R}/{{dataset}}/cams/{{cam}}.zarr", "mg": f"{R}/{{dataset}}/mean_gradient.zarr"}


def decoder_maps(mode):
    """The map stores a selection mode reads, as rule inputs (named like the `cldf decoder` options)."""
    return {name: MAP_STORES[name] for name in MODE_MAPS[mode]}


for _mode, _sub in SELECTION_DIRS.items():
    _CLDF = f"{R}/{{dataset}}/cldf/{_sub}"
    _LOGS = f"{R}/logs/{{dataset}}/cldf/{_sub}"
    _BENCH = f"{R}/benchmarks/{{dataset}}/cldf/{_sub}"

    rule:
        name:
            f"decoder_{_mode}"
        input:
            slices=SLICES,
            features=f"{R}/{{dataset}}/features.zarr",
            **decoder_maps(_mode),
        output:
            f"{_CLDF}decoder.pt",
        params:
            settings=decoder_settings(_mode),
            maps=lambda w, input, mode=_mode: " ".join(f"--{name} {shlex.quote(input[name])}" for name in decoder_maps(mode)),
        log:
            f"{_LOGS}decoder.log",
        benchmark:
            f"{_BENCH}decoder.tsv"
        threads: TRAIN_THREADS
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=GPU,
        shell:
            "cldf decoder --slices {input.slices:q} --features {input.features:q} {params.maps}"
            " --settings {params.settings:q} --out {output:q} --device {DEVICE} --seed {SEED} --threads {threads}"
            " > {log:q} 2>&1"

    rule:
        name:
            f"segment_shard_{_mode}"
        input:
            slices=SLICES,
            features=f"{R}/{{dataset}}/features.zarr",
            probs=PROBS,
            decoder=f"{_CLDF}decoder.pt",
        output:
            temp(directory(f"{R}/{{dataset}}/shards/cldf/{_sub}masks/{{shard}}.zarr")),
        params:
            settings=as_json(config["cldf"]["cluster"]),
            cases=lambda w: shard_cases(w.dataset, w.shard),
        log:
            f"{_LOGS}segment_{{shard}}.log",
        benchmark:
            f"{_BENCH}segment_{{shard}}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=60,
        shell:
            "cldf segment --slices {input.slices:q} --features {input.features:q} --decoder {input.decoder:q}"
            " --probs {input.probs:q} --settings {params.settings:q} --cases {params.cases} --out {output:q}"
            " --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"

    rule:
        name:
            f"masks_{_mode}"
        input:
            lambda w, sub=_sub: [
                f"{R}/{w.dataset}/shards/cldf/{sub.format(cam=getattr(w, 'cam', ''))}masks/{k}.zarr"
                for k in range(n_shards(w.dataset))
            ],
        output:
            directory(f"{_CLDF}masks.zarr"),
        log:
            f"{_LOGS}masks_gather.log",
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "cldf gather --shards {input:q} --out {output:q} > {log:q} 2>&1"


def baseline_map(wildcards):
    name = wildcards.baseline
    return f"{R}/{wildcards.dataset}/{'cams/' + name if name in CAMS else name}.zarr"


rule baseline_masks:
    """Threshold a CAM, MG or saliency map into masks of the test slices (one rule for all)."""
    input:
        slices=SLICES,
        map=baseline_map,
        probs=PROBS,
    output:
        directory(f"{R}/{{dataset}}/baselines/{{baseline}}/masks.zarr"),
    params:
        rule=config["evaluate"]["baseline_threshold"],
    wildcard_constraints:
        baseline="mean_gradient|saliency|" + "|".join(CAMS),
    log:
        f"{R}/logs/{{dataset}}/baselines/{{baseline}}.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "cldf baseline --slices {input.slices:q} --map {input.map:q} --probs {input.probs:q} --out {output:q} > {log:q} 2>&1"


rule fsl_masks:
    """Masks of the fully supervised UNet on the test slices (the upper bound of the table)."""
    input:
        slices=SLICES,
        model=f"{R}/{{dataset}}/models/fsl_unet.pt",
    output:
        directory(f"{R}/{{dataset}}/baselines/fsl_unet/masks.zarr"),
    log:
        f"{R}/logs/{{dataset}}/baselines/fsl_unet.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    shell:
        "cldf predict-fsl --slices {input.slices:q} --model {input.model:q} --out {output:q} --device {DEVICE}"
        " --threads {threads} > {log:q} 2>&1"


rule nifti:
    """CLDF masks of every test case as NIfTI in the case's original geometry."""
    input:
        slices=SLICES,
        masks=f"{R}/{{dataset}}/cldf/{{cam}}/masks.zarr",
    output:
        directory(f"{R}/{{dataset}}/cldf/{{cam}}/nifti"),
    log:
        f"{R}/logs/{{dataset}}/cldf/{{cam}}/nifti.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf nifti --slices {input.slices:q} --masks {input.masks:q} --out {output:q} > {log:q} 2>&1"
