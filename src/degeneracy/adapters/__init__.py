"""Framework adapters: everything that knows about TransformerLens or Hugging Face lives here.

The methods (bases, edges, accounting, LLC) work on any ``torch.nn.Module`` through the run layer and
``capture``; an adapter adds what a framework makes possible on top (closed-form sections of a
``HookedTransformer``, its attention heads, a last-position forward), always checked against the model.
"""
