"""Train the SSD-MobileNetV2-style detector (Keras) on the synthetic thermal scenes and export it the way
TensorFlow Object Detection API models ship: a frozen GraphDef ``.pb`` and a SavedModel.

Model: MobileNetV2 (alpha 0.35, weights=None: trained here from scratch) with three feature maps
(strides 8, 16, 32), two square anchors per cell, a 3x3 box and a 3x3 class convolution per map,
softmax over background + 4 classes, focal loss. Exports (``--out``, default models/ beside this file):

* ``ssd_mobilenet_v2_synth.pb``: image_tensor [1,160,160,3] uint8 -> detection_boxes [1,100,4]
  (normalized ymin,xmin,ymax,xmax), detection_scores, detection_classes (label-map ids 1..4),
  num_detections; NMS in the graph (tf.image.combined_non_max_suppression).
* ``ssd_mobilenet_v2_synth_raw.pb``: the same network without NMS: raw_detection_boxes [1,A,4] and
  raw_detection_scores [1,A,5] (column 0 background), as the OD API's raw outputs.
* ``ssd_mobilenet_v2_synth_savedmodel/``: the NMS graph as a SavedModel (serving_default).

    python benchmarks/detection/train_ssd.py --threads 2     # the shipped model: 12 epochs x 1200 scenes, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import synth_data

SIZE = 160
NUM_CLASSES = len(synth_data.CLASSES)
# (feature layer, stride, anchor sides in pixels)
LEVELS = (("block_6_expand_relu", 8, (12, 20)), ("block_13_expand_relu", 16, (28, 40)), ("out_relu", 32, (56, 80)))
BOX_VARIANCE = np.array([0.1, 0.1, 0.2, 0.2], np.float32)  # the OD API's box coder scales
POSITIVE_IOU, NEGATIVE_IOU = 0.45, 0.35
MAX_DETECTIONS = 100
MODELS = Path(__file__).parent / "models"


def anchors(size: int = SIZE) -> np.ndarray:
    """[A, 4] cy, cx, h, w normalized, in the order the heads' reshapes lay anchors out (level, row, column, anchor)."""
    rows = []
    for _, stride, sides in LEVELS:
        cells = size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        for y, x in zip(ys.ravel(), xs.ravel()):
            for side in sides:
                rows.append(((y + 0.5) * stride / size, (x + 0.5) * stride / size, side / size, side / size))
    return np.array(rows, np.float32)


def _iou(anchor_boxes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[A, G] IoU of yxyx boxes."""
    top = np.maximum(anchor_boxes[:, None, :2], boxes[None, :, :2])
    bottom = np.minimum(anchor_boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(bottom - top, 0, None), axis=2)
    area_a = np.prod(anchor_boxes[:, 2:] - anchor_boxes[:, :2], axis=1)
    area_b = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def targets(boxes: list[synth_data.Box], prior: np.ndarray, size: int = SIZE) -> np.ndarray:
    """[A, 4 + 1 + C]: encoded box offsets, then one-hot background+classes (all zero: ignored anchor)."""
    out = np.zeros((len(prior), 5 + NUM_CLASSES), np.float32)
    out[:, 4] = 1.0  # background
    if not boxes:
        return out
    gt = np.array([[b.y1, b.x1, b.y2, b.x2] for b in boxes], np.float32) / size
    prior_yxyx = np.concatenate([prior[:, :2] - prior[:, 2:] / 2, prior[:, :2] + prior[:, 2:] / 2], axis=1)
    iou = _iou(prior_yxyx, gt)
    best_gt, best_iou = iou.argmax(axis=1), iou.max(axis=1)
    best_iou[iou.argmax(axis=0)] = 1.0  # every object gets at least its best anchor
    best_gt[iou.argmax(axis=0)] = np.arange(len(gt))
    positive = best_iou >= POSITIVE_IOU
    ignored = (best_iou > NEGATIVE_IOU) & ~positive
    matched = gt[best_gt[positive]]
    centre, hw = (matched[:, :2] + matched[:, 2:]) / 2, matched[:, 2:] - matched[:, :2]
    p = prior[positive]
    out[positive, :2] = (centre - p[:, :2]) / p[:, 2:] / BOX_VARIANCE[:2]
    out[positive, 2:4] = np.log(hw / p[:, 2:]) / BOX_VARIANCE[2:]
    out[positive | ignored, 4] = 0.0
    out[positive, 5 + np.array([boxes[g].category for g in best_gt[positive]])] = 1.0
    return out


def build_network(size: int = SIZE):
    """Keras model: float images in [-1, 1] [N,S,S,3] -> [N, A, 4 + 1 + C] (box offsets, class logits)."""
    import keras

    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False, weights=None)
    box_parts, class_parts = [], []
    for layer, _, sides in LEVELS:
        feature = base.get_layer(layer).output
        feature = keras.layers.Conv2D(64, 1, activation="relu6", name=f"{layer}_neck")(feature)
        box = keras.layers.Conv2D(len(sides) * 4, 3, padding="same", name=f"{layer}_box")(feature)
        logits = keras.layers.Conv2D(len(sides) * (1 + NUM_CLASSES), 3, padding="same", name=f"{layer}_class")(feature)
        box_parts.append(keras.layers.Reshape((-1, 4))(box))
        class_parts.append(keras.layers.Reshape((-1, 1 + NUM_CLASSES))(logits))
    boxes = keras.layers.Concatenate(axis=1)(box_parts)
    logits = keras.layers.Concatenate(axis=1)(class_parts)
    return keras.Model(base.input, keras.layers.Concatenate(axis=2)([boxes, logits]), name="ssd_mobilenet_v2_synth")


def detection_loss(y_true, y_pred):
    """Smooth L1 on the positives' offsets + softmax focal loss (gamma 2), both over the positives' count."""
    import tensorflow as tf

    labels, logits = y_true[..., 4:], y_pred[..., 4:]
    positive = 1.0 - labels[..., 0] - tf.cast(tf.reduce_sum(labels, -1) == 0, tf.float32)
    count = tf.maximum(tf.reduce_sum(positive), 1.0)
    diff = tf.abs(y_true[..., :4] - y_pred[..., :4])
    smooth_l1 = tf.reduce_sum(tf.where(diff < 1.0, 0.5 * diff**2, diff - 0.5), -1)
    log_p = tf.nn.log_softmax(logits)
    p_true = tf.reduce_sum(labels * tf.exp(log_p), -1)
    focal = -tf.reduce_sum(labels * log_p, -1) * (1.0 - p_true) ** 2
    return (tf.reduce_sum(smooth_l1 * positive) + tf.reduce_sum(focal)) / count


def _decode(tf, raw, prior: np.ndarray):
    """Offsets + logits -> normalized yxyx boxes [N,A,4] (clipped) and softmax scores [N,A,1+C]."""
    offsets, logits = raw[..., :4] * BOX_VARIANCE, raw[..., 4:]
    centre = prior[:, :2] + offsets[..., :2] * prior[:, 2:]
    hw = prior[:, 2:] * tf.exp(tf.minimum(offsets[..., 2:], 4.0))
    boxes = tf.clip_by_value(tf.concat([centre - hw / 2, centre + hw / 2], axis=-1), 0.0, 1.0)
    return boxes, tf.nn.softmax(logits)


def export_functions(network, size: int = SIZE):
    """tf.functions from uint8 pixels, as OD API exports take them: (with NMS, without NMS)."""
    import tensorflow as tf

    prior = anchors(size)
    signature = [tf.TensorSpec([1, size, size, 3], tf.uint8, name="image_tensor")]

    def decoded(image_tensor):
        raw = network(tf.cast(image_tensor, tf.float32) / 127.5 - 1.0, training=False)
        return _decode(tf, raw, prior)

    @tf.function(input_signature=signature)
    def with_nms(image_tensor):
        boxes, scores = decoded(image_tensor)
        nmsed = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores[:, :, 1:], max_output_size_per_class=MAX_DETECTIONS,
            max_total_size=MAX_DETECTIONS, iou_threshold=0.5, score_threshold=0.001, clip_boxes=False)
        return {"detection_boxes": nmsed.nmsed_boxes, "detection_scores": nmsed.nmsed_scores,
                "detection_classes": nmsed.nmsed_classes + 1.0,
                "num_detections": tf.cast(nmsed.valid_detections, tf.float32)}

    @tf.function(input_signature=signature)
    def without_nms(image_tensor):
        boxes, scores = decoded(image_tensor)
        return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}

    return with_nms, without_nms


def write_frozen_graph(function, path: Path) -> None:
    """convert_variables_to_constants_v2 on the concrete function; outputs renamed to their dict keys
    (a frozen function names them Identity, Identity_1, ...), as OD API graphs name them."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = function.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    keys = sorted(concrete.structured_outputs)  # tf.nest flattens dicts in key order
    renames = {t.name.split(":")[0]: key for t, key in zip(frozen.outputs, keys)}
    for node in graph_def.node:
        node.name = renames.get(node.name, node.name)
        node.input[:] = [renames.get(i, i) for i in node.input]
    temporary = path.with_suffix(".pb.tmp")
    temporary.write_bytes(graph_def.SerializeToString())
    temporary.replace(path)


def export(network, out: Path) -> None:
    """The frozen graphs (with and without NMS) and the SavedModel of a trained network, into ``out``."""
    import tensorflow as tf

    # A fresh copy without the optimizer: the SavedModel would otherwise carry Adam's slots (3x the weights).
    trained, network = network, build_network()
    network.set_weights(trained.get_weights())
    with_nms, without_nms = export_functions(network)
    write_frozen_graph(with_nms, out / "ssd_mobilenet_v2_synth.pb")
    write_frozen_graph(without_nms, out / "ssd_mobilenet_v2_synth_raw.pb")
    module = tf.Module()
    module.network = network
    module.detect = with_nms
    tf.saved_model.save(module, str(out / "ssd_mobilenet_v2_synth_savedmodel"), signatures={"serving_default": with_nms})


def train(epochs: int, train_count: int, seed: int, batch: int, out: Path, keras_copy: Path | None = None) -> dict:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    pixels, labels = synth_data.scenes_in_memory(train_count, seed, SIZE)
    prior = anchors()
    y = np.stack([targets(b, prior) for b in labels])
    x = pixels[..., None]

    def to_input(image, target):
        return tf.image.grayscale_to_rgb(tf.cast(image, tf.float32) / 127.5 - 1.0), target

    data = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(train_count, seed=seed)
            .batch(batch, drop_remainder=True).map(to_input).prefetch(2))
    network = build_network()
    for layer in network.layers:
        # keras.applications' MobileNetV2 averages batch statistics with momentum 0.999: a few hundred
        # steps leave the inference-time statistics mostly at their initial values (the exported model
        # then finds nothing), so they follow the batches faster here.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    steps = epochs * (train_count // batch)
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, steps, warmup_target=None, alpha=0.02)
    network.compile(optimizer=keras.optimizers.Adam(schedule), loss=detection_loss)
    history = network.fit(data, epochs=epochs, verbose=2)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    if keras_copy is not None:
        network.save(keras_copy)
    export(network, out)
    return {"epochs": epochs, "train_images": train_count, "seed": seed, "batch": batch,
            "train_seconds": round(seconds, 1), "final_loss": round(float(history.history["loss"][-1]), 4),
            "loss_per_epoch": [round(float(v), 4) for v in history.history["loss"]],
            "params": int(network.count_params())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=1200, help="training scenes (seed --seed of synth_data)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads TensorFlow may use")
    parser.add_argument("--out", type=Path, default=MODELS)
    parser.add_argument("--keras", type=Path, help="also save the trained Keras model here (.keras)")
    parser.add_argument("--export-only", type=Path, metavar="KERAS", help="export this saved .keras model, no training")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.export_only:
        import keras

        export(keras.models.load_model(args.export_only, compile=False), args.out)
        return
    record = train(args.epochs, args.train, args.seed, args.batch, args.out, args.keras)
    (args.out / "ssd_training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
