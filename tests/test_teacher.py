"""The open_clip teacher with real weights (teacher.kind=open_clip teacher.weights=...): the
path for a real CLIP, which cannot be downloaded here, so a randomly initialised ViT-S-32
stands in for its weights. They load whatever the wrapping (DDP, state_dict); weights of
another architecture, a file that is no checkpoint and an unknown model name are one clear
error each."""

import numpy as np
import pytest
import torch

from clipgs.errors import ConfigError
from clipgs.models.teacher import Teacher, TeacherConfig


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    import open_clip

    torch.manual_seed(3)
    model = open_clip.create_model("ViT-S-32", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit-s-32.pt"
    # as open_clip's own training writes them: DDP's "module." under "state_dict"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, path)
    return model.eval(), path


def test_open_clip_teacher_loads_real_weights(clip_weights):
    import open_clip

    model, path = clip_weights
    teacher = Teacher(TeacherConfig(kind="open_clip", open_clip_model="ViT-S-32",
                                    weights=str(path)))
    tokens = open_clip.get_tokenizer("ViT-S-32")(["a chair"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(teacher.encode_text(["a chair"]), expected, atol=1e-5)
    assert teacher.image_size == 224


def test_teacher_weights_that_do_not_fit_are_one_clear_error(clip_weights, tmp_path):
    _, path = clip_weights
    with pytest.raises(ConfigError, match=r"do not fit the model .*other shapes "
                       r"\['visual.positional_embedding \(50, 384\)"):
        Teacher(TeacherConfig(kind="open_clip", open_clip_model="ViT-S-16",
                              weights=str(path)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(ConfigError, match="teacher.weights: .*junk.safetensors: not a "
                       "safetensors file"):
        Teacher(TeacherConfig(kind="open_clip", open_clip_model="ViT-S-32",
                              weights=str(junk)))
    with pytest.raises(ConfigError, match="teacher.open_clip_model=ViT-Nope"):
        Teacher(TeacherConfig(kind="open_clip", open_clip_model="ViT-Nope"))
