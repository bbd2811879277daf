from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT8: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_REGRESSION: _ClassVar[Task]
    TASK_MIXED: _ClassVar[Task]

class OutputSemantics(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_SEMANTICS_UNSPECIFIED: _ClassVar[OutputSemantics]
    OUTPUT_SEMANTICS_LOGITS: _ClassVar[OutputSemantics]
    OUTPUT_SEMANTICS_PROBABILITIES: _ClassVar[OutputSemantics]
    OUTPUT_SEMANTICS_VALUES: _ClassVar[OutputSemantics]
    OUTPUT_SEMANTICS_VARIANCE: _ClassVar[OutputSemantics]
    OUTPUT_SEMANTICS_LOG_VARIANCE: _ClassVar[OutputSemantics]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_UNAVAILABLE: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT8: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_BOOL: DataType
TASK_UNSPECIFIED: Task
TASK_CLASSIFICATION: Task
TASK_REGRESSION: Task
TASK_MIXED: Task
OUTPUT_SEMANTICS_UNSPECIFIED: OutputSemantics
OUTPUT_SEMANTICS_LOGITS: OutputSemantics
OUTPUT_SEMANTICS_PROBABILITIES: OutputSemantics
OUTPUT_SEMANTICS_VALUES: OutputSemantics
OUTPUT_SEMANTICS_VARIANCE: OutputSemantics
OUTPUT_SEMANTICS_LOG_VARIANCE: OutputSemantics
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_UNAVAILABLE: VersionState
VERSION_STATE_UNLOADING: VersionState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "inputs", "num_samples", "return_samples", "interval_levels", "target_standard_error", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RETURN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LEVELS_FIELD_NUMBER: _ClassVar[int]
    TARGET_STANDARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    num_samples: int
    return_samples: bool
    interval_levels: _containers.RepeatedScalarFieldContainer[float]
    target_standard_error: float
    seed: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., num_samples: _Optional[int] = ..., return_samples: _Optional[bool] = ..., interval_levels: _Optional[_Iterable[float]] = ..., target_standard_error: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Interval(_message.Message):
    __slots__ = ("level", "method", "lower", "upper")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    level: float
    method: str
    lower: Tensor
    upper: Tensor
    def __init__(self, level: _Optional[float] = ..., method: _Optional[str] = ..., lower: _Optional[_Union[Tensor, _Mapping]] = ..., upper: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OutputStatistics(_message.Message):
    __slots__ = ("name", "semantics", "mean", "variance", "std", "predicted_class", "predicted_label", "predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio", "samples", "aleatoric_variance", "total_variance", "intervals")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEMANTICS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_INFORMATION_FIELD_NUMBER: _ClassVar[int]
    VARIATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ALEATORIC_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    INTERVALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    semantics: OutputSemantics
    mean: Tensor
    variance: Tensor
    std: Tensor
    predicted_class: Tensor
    predicted_label: _containers.RepeatedScalarFieldContainer[str]
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variation_ratio: Tensor
    samples: Tensor
    aleatoric_variance: Tensor
    total_variance: Tensor
    intervals: _containers.RepeatedCompositeFieldContainer[Interval]
    def __init__(self, name: _Optional[str] = ..., semantics: _Optional[_Union[OutputSemantics, str]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., variance: _Optional[_Union[Tensor, _Mapping]] = ..., std: _Optional[_Union[Tensor, _Mapping]] = ..., predicted_class: _Optional[_Union[Tensor, _Mapping]] = ..., predicted_label: _Optional[_Iterable[str]] = ..., predictive_entropy: _Optional[_Union[Tensor, _Mapping]] = ..., expected_entropy: _Optional[_Union[Tensor, _Mapping]] = ..., mutual_information: _Optional[_Union[Tensor, _Mapping]] = ..., variation_ratio: _Optional[_Union[Tensor, _Mapping]] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., aleatoric_variance: _Optional[_Union[Tensor, _Mapping]] = ..., total_variance: _Optional[_Union[Tensor, _Mapping]] = ..., intervals: _Optional[_Iterable[_Union[Interval, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "num_samples", "outputs", "num_samples_per_row")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    num_samples: int
    outputs: _containers.RepeatedCompositeFieldContainer[OutputStatistics]
    num_samples_per_row: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., num_samples: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[OutputStatistics, _Mapping]]] = ..., num_samples_per_row: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: VersionState
    reason: str
    def __init__(self, version: _Optional[str] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "task", "ready", "reason", "version_status")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    ready: bool
    reason: str
    version_status: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ..., version_status: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "semantics", "max_shape", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SEMANTICS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    semantics: OutputSemantics
    max_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., semantics: _Optional[_Union[OutputSemantics, str]] = ..., max_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class DropoutLayer(_message.Message):
    __slots__ = ("module", "type", "p")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    module: str
    type: str
    p: float
    def __init__(self, module: _Optional[str] = ..., type: _Optional[str] = ..., p: _Optional[float] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "versions", "task", "description", "inputs", "outputs", "labels", "default_num_samples", "max_num_samples", "provider", "opset", "dropout", "verified", "weights_sha256", "version_status")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSION_STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    description: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    labels: _containers.RepeatedScalarFieldContainer[str]
    default_num_samples: int
    max_num_samples: int
    provider: str
    opset: int
    dropout: _containers.RepeatedCompositeFieldContainer[DropoutLayer]
    verified: bool
    weights_sha256: str
    version_status: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ..., description: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., default_num_samples: _Optional[int] = ..., max_num_samples: _Optional[int] = ..., provider: _Optional[str] = ..., opset: _Optional[int] = ..., dropout: _Optional[_Iterable[_Union[DropoutLayer, _Mapping]]] = ..., verified: _Optional[bool] = ..., weights_sha256: _Optional[str] = ..., version_status: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...
