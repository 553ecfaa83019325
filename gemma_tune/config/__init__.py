"""Recipes: composition, validation and the schema of every key."""

from gemma_tune.config.schema import Recipe
from gemma_tune.config.validate import load_recipe, recipe_architecture

__all__ = ["Recipe", "load_recipe", "recipe_architecture"]
