"""Send each question to a cheap or a strong model.

Most questions over documentation are lookups ("what is the default port?")
that a small model answers as well as a large one; comparisons, multi-step
reasoning, explanations and code deserve the strong model. A bag-of-words
logistic regression learns the difference from a labelled JSONL file in
milliseconds and decides in microseconds, so routing costs nothing next to
generation. Retrain by editing the examples: the saved model is rebuilt
whenever the examples file is newer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal, cast

import joblib
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from ragline.config import RouterSettings

Route = Literal["cheap", "strong"]
ROUTES: tuple[Route, ...] = ("cheap", "strong")
DEFAULT_EXAMPLES = Path(__file__).parent / "data" / "router_examples.jsonl"


def router_path(settings: RouterSettings, data_dir: Path) -> Path:
    """Where the trained router lives: the configured path, else under the data dir."""
    return settings.model_path or data_dir / "models" / "router.joblib"


class RouterError(ValueError):
    pass


def read_examples(path: Path) -> tuple[list[str], list[Route]]:
    """Read `{"query": ..., "label": "cheap" | "strong"}` lines; blank lines are skipped."""
    queries: list[str] = []
    labels: list[Route] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                query, label = example["query"], example["label"]
            except (ValueError, KeyError, TypeError) as exc:
                raise RouterError(f'{path}:{number}: expected {{"query": ..., "label": ...}}: {exc}') from exc
            if label not in ROUTES or not isinstance(query, str) or not query.strip():
                raise RouterError(f"{path}:{number}: needs a non-empty query and a label in {ROUTES}")
            queries.append(query)
            labels.append(label)
    if set(labels) != set(ROUTES):
        raise RouterError(f"{path}: needs examples of both labels {ROUTES}")
    return queries, labels


class Router:
    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline

    @classmethod
    def train(cls, examples: Path = DEFAULT_EXAMPLES) -> Router:
        queries, labels = read_examples(examples)
        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            LogisticRegression(C=10.0, class_weight="balanced", max_iter=1000),
        )
        pipeline.fit(queries, labels)
        return cls(pipeline)

    def save(self, path: Path) -> None:
        """Write atomically, so a concurrent reader never loads half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                joblib.dump({"sklearn": sklearn.__version__, "pipeline": self._pipeline}, out)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise

    @classmethod
    def load(cls, path: Path) -> Router:
        """Load a saved router. Like any pickle, only load files this installation wrote."""
        saved = joblib.load(path)
        if saved.get("sklearn") != sklearn.__version__:
            raise RouterError(f"{path} was saved with scikit-learn {saved.get('sklearn')}, not {sklearn.__version__}")
        return cls(saved["pipeline"])

    @classmethod
    def load_or_train(cls, model_path: Path, examples: Path = DEFAULT_EXAMPLES) -> Router:
        """Load `model_path` if it is newer than the examples and loads cleanly; otherwise retrain and save."""
        if model_path.is_file() and model_path.stat().st_mtime >= examples.stat().st_mtime:
            try:
                return cls.load(model_path)
            except (RouterError, OSError, ValueError, KeyError, AttributeError):
                pass  # stale or unreadable: rebuilt below
        router = cls.train(examples)
        router.save(model_path)
        return router

    def strong_probability(self, query: str) -> float:
        classes = list(self._pipeline.classes_)
        return float(self._pipeline.predict_proba([query])[0][classes.index("strong")])

    def choose(self, query: str) -> Route:
        return cast(Route, self._pipeline.predict([query])[0])
