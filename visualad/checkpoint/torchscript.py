"""State dicts of TorchScript archives (``torch.jit.save``, e.g. OpenAI's ``ViT-L-14-336px.pt``).

The archive pickles the module object itself: each ``__torch__.*`` instance carries its parameters,
buffers, submodules and plain settings as attributes. The state-dict name of a tensor is the path of
attribute names leading to it (``visual.transformer.resblocks.0.attn.in_proj_weight``), exactly what
``module.state_dict()`` returns in PyTorch. Plain numbers along the way (``num_heads``...) are
collected too, since they tell what the weights alone cannot.
"""
from __future__ import annotations

from collections import OrderedDict

from .lazy import LazyTensor
from .unpickler import TorchScriptObject


def is_torchscript(obj) -> bool:
    """True for the root object of a TorchScript archive."""
    return isinstance(obj, TorchScriptObject)


def module_state(root: TorchScriptObject) -> tuple[OrderedDict, dict]:
    """``(tensors, numbers)``: the tensors of the attribute tree by dotted path, and the int/float
    attributes by dotted path (``{'visual.transformer.resblocks.0.attn.num_heads': 16, ...}``)."""
    tensors: OrderedDict = OrderedDict()
    numbers: dict = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        children = []
        for name, value in obj.attributes.items():
            path = prefix + str(name)
            if isinstance(value, LazyTensor):
                tensors.setdefault(path, value)
            elif isinstance(value, TorchScriptObject):
                children.append((path + ".", value))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[path] = value
        stack.extend(reversed(children))
    return tensors, numbers
