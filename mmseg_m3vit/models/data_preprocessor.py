"""Multi-task data preprocessor (MODELS: MultiTaskDataPreprocessor). Being written."""
