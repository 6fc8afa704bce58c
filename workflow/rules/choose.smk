# Every open choice, made on the validation split: LayerCAM's layers (cldf.evaluate.choices; the thresholds
# of the baseline maps and the intensity channel are chosen by rule `baselines`); CLDF's decoder optimiser
# (the best candidate decoder is kept) and the unlabelled protocol's CDM conditioning and gate
# (cldf.evaluate.choose). selection.csv gathers them.


rule choose_layers:
    """The layers a per-layer CAM (LayerCAM) is fused over, chosen on validation; CLDF's CAM path needs only this."""
    input:
        slices=CAT.pattern("slices"),
        map=lambda w: CAT.path("map", dataset=w.dataset, map=MAPS[w.cam].store),
    output:
        CAT.pattern("layer_choices"),
    params:
        settings=as_json(PLAN.map_choice_settings()),
    wildcard_constraints:
        cam="|".join(PLAN.per_layer_cams()) or "-",
    log:
        CAT.log(CAT.pattern("layer_choices")),
    priority: 2
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf choose-layers --slices {input.slices:q} --map {input.map:q} --name {wildcards.cam}"
        " --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


rule tune_decoder:
    """Train CLDF's decoder for every candidate of the grid; keep the best on validation."""
    input:
        slices=CAT.pattern("slices"),
        features=FEATURES,
        cam=final_cam,
        mg=MEAN_GRADIENT,
    output:
        decoder=CAT.pattern("decoder", selection="fused"),
        rows=CAT.pattern("tuning"),
    params:
        settings=as_json(PLAN.tune_settings()),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("tuning")),
    benchmark:
        CAT.benchmark(CAT.pattern("tuning"))
    threads: PLAN.tune_threads()
    priority: 2
    resources:
        mem_mb=6000,
        runtime=120,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf tune --slices {input.slices:q} --features {input.features:q} --cam {input.cam:q} --mg {input.mg:q}"
        " --settings {params.settings:q} --out {output.decoder:q} --rows-out {output.rows:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule decoder_ablation:
    """CLDF's decoder trained on the CAM alone or the mean-gradient map alone (the settings chosen for CLDF)."""
    input:
        slices=CAT.pattern("slices"),
        features=FEATURES,
        cam=final_cam,
        mg=MEAN_GRADIENT,
        tuning=CAT.pattern("tuning"),
    output:
        CAT.pattern("decoder"),
    wildcard_constraints:
        selection="cam|mg",
    params:
        settings=as_json(PLAN.tune_settings()),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("decoder")),
    benchmark:
        CAT.benchmark(CAT.pattern("decoder"))
    threads: TRAIN_THREADS
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf decoder --slices {input.slices:q} --features {input.features:q} --cam {input.cam:q} --mg {input.mg:q}"
        " --mode {wildcards.selection} --tuning {input.tuning:q} --settings {params.settings:q} --out {output:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule choose_unlabelled:
    """The CDM conditioning of unlabelled slices and the classifier gate, chosen on validation with CLDF."""
    input:
        slices=CAT.pattern("slices"),
        cdm=CAT.pattern("model", model="cdm"),
        decoder=CAT.pattern("decoder", selection="fused"),
        tuning=CAT.pattern("tuning"),
        probs=PROBS,
    output:
        CAT.pattern("unlabelled_choices"),
    params:
        settings=as_json(PLAN.unlabelled_settings()),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("unlabelled_choices")),
    threads: 1
    priority: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf choose-unlabelled --slices {input.slices:q} --cdm {input.cdm:q} --decoder {input.decoder:q} --tuning {input.tuning:q}"
        " --probs {input.probs:q} --settings {params.settings:q} --out {output:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule selection:
    """Every choice made on validation, with the grid it was picked from (choice, value, val_dice, chosen)."""
    input:
        parts=[CAT.pattern("map_choices"), *[CAT.pattern("layer_choices", cam=cam) for cam in PLAN.per_layer_cams()],
               CAT.pattern("tuning", cam=config["cldf"]["cam"]), CAT.pattern("unlabelled_choices", cam=config["cldf"]["cam"])],
        tagged=lambda w: list(tagged_choices(w.dataset)),
    output:
        SELECTION,
    params:
        tagged=lambda w: " ".join(shlex.quote(f"{cam}={path}") for path, cam in tagged_choices(w.dataset).items()),
    log:
        CAT.log(SELECTION),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf selection --parts {input.parts:q} --tagged {params.tagged} --out {output:q} > {log:q} 2>&1"
