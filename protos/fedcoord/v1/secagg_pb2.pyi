from protos.fedcoord.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggSetup(_message.Message):
    __slots__ = ("sites", "k", "t", "ring_bits", "graph_seed", "clip_range", "levels", "max_examples", "l2_clip", "layout")
    SITES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    L2_CLIP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedScalarFieldContainer[str]
    k: int
    t: int
    ring_bits: int
    graph_seed: bytes
    clip_range: float
    levels: int
    max_examples: float
    l2_clip: float
    layout: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSpec]
    def __init__(self, sites: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., t: _Optional[int] = ..., ring_bits: _Optional[int] = ..., graph_seed: _Optional[bytes] = ..., clip_range: _Optional[float] = ..., levels: _Optional[int] = ..., max_examples: _Optional[float] = ..., l2_clip: _Optional[float] = ..., layout: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("encryption_key", "mask_key", "seed_commitment")
    ENCRYPTION_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    encryption_key: bytes
    mask_key: bytes
    seed_commitment: bytes
    def __init__(self, encryption_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ...) -> None: ...

class SecAggSiteKeys(_message.Message):
    __slots__ = ("site", "keys")
    SITE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    site: str
    keys: SecAggKeys
    def __init__(self, site: _Optional[str] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SecAggSiteKeys]
    def __init__(self, sites: _Optional[_Iterable[_Union[SecAggSiteKeys, _Mapping]]] = ...) -> None: ...

class SecAggBundle(_message.Message):
    __slots__ = ("sender", "receiver", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    receiver: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., receiver: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[SecAggBundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[SecAggBundle, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggRevealedShare(_message.Message):
    __slots__ = ("owner", "x", "y")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    owner: str
    x: int
    y: bytes
    def __init__(self, owner: _Optional[str] = ..., x: _Optional[int] = ..., y: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("seed_shares", "key_shares")
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    seed_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealedShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealedShare]
    def __init__(self, seed_shares: _Optional[_Iterable[_Union[SecAggRevealedShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[SecAggRevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggTask(_message.Message):
    __slots__ = ("session", "setup", "roster", "delivery", "unmask")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    session: str
    setup: SecAggSetup
    roster: SecAggRoster
    delivery: SecAggShares
    unmask: SecAggUnmaskRequest
    def __init__(self, session: _Optional[str] = ..., setup: _Optional[_Union[SecAggSetup, _Mapping]] = ..., roster: _Optional[_Union[SecAggRoster, _Mapping]] = ..., delivery: _Optional[_Union[SecAggShares, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("session", "keys", "shares", "masked_input", "unmask")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    session: str
    keys: SecAggKeys
    shares: SecAggShares
    masked_input: bool
    unmask: SecAggUnmaskResponse
    def __init__(self, session: _Optional[str] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., masked_input: _Optional[bool] = ..., unmask: _Optional[_Union[SecAggUnmaskResponse, _Mapping]] = ...) -> None: ...
