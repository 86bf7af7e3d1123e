"""Reading CLIP / DINOv2 backbones and VisualAD heads from checkpoint files, without PyTorch.

Containers: torch zip (``torch.save``), TorchScript archives (``torch.jit.save``), the legacy
pre-zip torch format, safetensors (single or sharded) and Hugging Face model folders. Pickles are
read through an allow-list: a file can never run code. Namings are converted to OpenAI CLIP
(``visual.*``) or DINOv2-hub names.

>>> bw = load_backbone("ViT-L-14-336px.pt")
>>> bw.family, bw.hints["activation"], bw.tensors["visual.conv1.weight"].shape
('clip', 'quick_gelu', (1024, 3, 14, 14))
"""
from .lazy import to_float32
from .loader import BackboneWeights, load_backbone, load_head, read_checkpoint

__all__ = ["BackboneWeights", "load_backbone", "load_head", "read_checkpoint", "to_float32"]
