"""The miniature world: a small visual-reasoning domain with pretrained backbones, where the recipe can be measured."""
