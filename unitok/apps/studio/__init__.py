"""UniTok Studio (``unitok studio``): a local web app to tokenize images, see and mix the sub-codebooks,
classify and chat, and generate, over one shared set of models (gradio, ``pip install "unitok-vision[studio]"``).

    >>> from unitok.apps.studio import StudioLimits, load_models, serve
    >>> app, url = serve(load_models(tokenizer='demo_output/train/model'), StudioLimits(), block=False)

Tabs: Tokenize, Sub-codebooks, Understand, Generate (see ``ui``). It calls only the library's public API.
"""
from .limits import StudioInputError, StudioLimits
from .models import StudioModels, load_models
from .server import serve

__all__ = ['StudioLimits', 'StudioInputError', 'StudioModels', 'load_models', 'serve']
