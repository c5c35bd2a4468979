"""tinyllama: a Llama-style language model built from its ground blocks, pretrained,
fine-tuned and aligned with human feedback. Each name below is derived in a chapter of
the course (https://github.com/tinyllama-course/tinyllama); its module carries the
chapter's name.

    from tinyllama import LLM, LLMConfig, Tokenizer, train, generate

`tinyllama.train` and `tinyllama.generate` are the functions; their modules are
`tinyllama.train` and `tinyllama.generate` for `from ... import ...` (for example
`from tinyllama.train import lr_at`) and via `importlib.import_module`.

This file is written by hand (nbdev generates every other module from nbs/).
"""

__version__ = "0.1.0"

from .profiles import get_profile  # appendix 91
from .device import get_device  # appendix 90
from .data import StoryWorld, default_world  # chapter 01
from .tokenizer import Tokenizer, train_tokenizer  # chapter 01b
from .model import LLM, LLMConfig  # chapter 06
from .interop import load_hf, save_hf  # chapter 06b
from .train import NextTokenPredictionDataset, TrainingConfig, pretrain, train  # 07
from .checkpoint import load_checkpoint, load_model, save_checkpoint  # chapter 07b
from .generate import CompiledDecoder, generate, generate_text  # chapter 08
from .quantize import quantize_int8  # chapter 08b
from .base import base_model  # chapter 07d
from .sft import SFTDataset, format_rate, run_sft, sft_train, wilson_interval  # chapter 09
from .reward import GoldenRewardModel, RewardModel, train_reward_model  # chapter 10
from .ppo import PPOConfig, PPOTrainer, run_copy_task  # chapter 11
from .feedback import run_feedback_loop  # chapter 12
from .grpo import GRPOConfig, GRPOTrainer  # chapter 14

__all__ = [
    "get_profile",
    "get_device",
    "StoryWorld",
    "default_world",
    "Tokenizer",
    "train_tokenizer",
    "LLM",
    "LLMConfig",
    "save_hf",
    "load_hf",
    "TrainingConfig",
    "NextTokenPredictionDataset",
    "train",
    "pretrain",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "base_model",
    "generate",
    "generate_text",
    "CompiledDecoder",
    "quantize_int8",
    "SFTDataset",
    "sft_train",
    "run_sft",
    "wilson_interval",
    "format_rate",
    "RewardModel",
    "GoldenRewardModel",
    "train_reward_model",
    "PPOConfig",
    "PPOTrainer",
    "run_copy_task",
    "run_feedback_loop",
    "GRPOConfig",
    "GRPOTrainer",
]
