//! Raw PJRT C API declarations: only what we call, laid out as in `xla/pjrt/c/pjrt_c_api.h`.
//!
//! Every argument struct begins with `struct_size` and `extension_start`; a plugin rejects
//! a `struct_size` smaller than its own and accepts a larger one, so these structs must be
//! at least as new as the plugins. The API table is append-only within major version 0:
//! a function's slot is its position below, checked against the table's `struct_size`.

use std::ffi::{c_char, c_void};

/// `PJRT_Api` header: `struct_size`, `extension_start`, `PJRT_Api_Version`; function
/// pointers follow at this offset.
pub const API_FUNCTIONS_OFFSET: usize = 40;
/// Offset of `pjrt_api_version.major_version` (then `minor_version`) in `PJRT_Api`.
pub const API_VERSION_OFFSET: usize = 32;

/// The function slots of `PJRT_Api`, in header order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Slot {
    ErrorDestroy = 0,
    ErrorMessage = 1,
    ErrorGetCode = 2,
    PluginInitialize = 3,
    PluginAttributes = 4,
    EventDestroy = 5,
    EventIsReady = 6,
    EventError = 7,
    EventAwait = 8,
    EventOnReady = 9,
    ClientCreate = 10,
    ClientDestroy = 11,
    ClientPlatformName = 12,
    ClientProcessIndex = 13,
    ClientPlatformVersion = 14,
    ClientDevices = 15,
    ClientAddressableDevices = 16,
    ClientLookupDevice = 17,
    ClientLookupAddressableDevice = 18,
    ClientAddressableMemories = 19,
    ClientCompile = 20,
    ClientDefaultDeviceAssignment = 21,
    ClientBufferFromHostBuffer = 22,
    LoadedExecutableDestroy = 50,
    LoadedExecutableGetExecutable = 51,
    LoadedExecutableAddressableDevices = 52,
    LoadedExecutableExecute = 55,
    BufferDestroy = 58,
    BufferToHostBuffer = 70,
    BufferUnsafePointer = 73,
    ExecutableDestroy = 40,
    ExecutableName = 41,
    ExecutableNumReplicas = 42,
    ExecutableNumPartitions = 43,
    ExecutableNumOutputs = 44,
    ExecutableSizeOfGeneratedCodeInBytes = 45,
    ExecutableGetCostAnalysis = 46,
    TopologyDescriptionCreate = 82,
    TopologyDescriptionDestroy = 83,
    TopologyDescriptionPlatformName = 84,
    TopologyDescriptionPlatformVersion = 85,
    TopologyDescriptionGetDeviceDescriptions = 86,
    Compile = 89,
}

pub type PjrtFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// Zeroed space after the fields we know: newer plugins append fields to argument structs
/// and read them when `struct_size` covers them; zero is every such field's "unset".
const RESERVED_WORDS: usize = 8;

macro_rules! args {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        pub struct $name {
            pub struct_size: usize,
            pub extension_start: *mut c_void,
            $(pub $field: $ty,)*
            _reserved: [usize; RESERVED_WORDS],
        }
        // `new`, not `Default`: the value is not a neutral default but the one form a PJRT
        // call accepts (zeroed, `struct_size` set).
        #[allow(clippy::new_without_default)]
        impl $name {
            /// Zeroed, with `struct_size` set: the form every PJRT call expects.
            pub fn new() -> Self {
                // SAFETY: all fields are integers or raw pointers, for which zero is valid.
                let mut a: Self = unsafe { std::mem::zeroed() };
                a.struct_size = std::mem::size_of::<Self>();
                a
            }
        }
    };
}

args!(ErrorDestroyArgs { error: *mut c_void });
args!(ErrorMessageArgs { error: *mut c_void, message: *const c_char, message_size: usize });
args!(ErrorGetCodeArgs { error: *mut c_void, code: i32 });
args!(PluginInitializeArgs {});
args!(TopologyCreateArgs {
    topology_name: *const c_char,
    topology_name_size: usize,
    create_options: *const NamedValue,
    num_options: usize,
    topology: *mut c_void,
});
args!(TopologyDestroyArgs { topology: *mut c_void });
args!(TopologyStringArgs { topology: *mut c_void, value: *const c_char, value_size: usize });
args!(TopologyDevicesArgs { topology: *mut c_void, descriptions: *const *mut c_void, num_descriptions: usize });
args!(
    /// `PJRT_Program`: the code to compile and its format (`"mlir"` for StableHLO, as text or
    /// MLIR bytecode).
    Program { code: *const c_char, code_size: usize, format: *const c_char, format_size: usize }
);
impl Program {
    /// StableHLO (format `"mlir"`): text, or MLIR bytecode such as a portable artifact, which
    /// PJRT tells apart by its magic number; `code` must outlive the call that reads it.
    pub fn mlir(code: &[u8]) -> Program {
        const FORMAT: &str = "mlir";
        let mut p = Program::new();
        p.code = code.as_ptr() as *const c_char;
        p.code_size = code.len();
        p.format = FORMAT.as_ptr() as *const c_char;
        p.format_size = FORMAT.len();
        p
    }
}

args!(CompileArgs {
    topology: *mut c_void,
    program: *const Program,
    compile_options: *const c_char,
    compile_options_size: usize,
    client: *mut c_void,
    executable: *mut c_void,
});
args!(ExecutableDestroyArgs { executable: *mut c_void });
args!(ClientCreateArgs {
    create_options: *const NamedValue,
    num_options: usize,
    kv_get_callback: *mut c_void,
    kv_get_user_arg: *mut c_void,
    kv_put_callback: *mut c_void,
    kv_put_user_arg: *mut c_void,
    client: *mut c_void,
});
args!(ClientDestroyArgs { client: *mut c_void });
args!(ClientStringArgs { client: *mut c_void, value: *const c_char, value_size: usize });
args!(ClientDevicesArgs { client: *mut c_void, devices: *const *mut c_void, num_devices: usize });
args!(ClientCompileArgs {
    client: *mut c_void,
    program: *const Program,
    compile_options: *const c_char,
    compile_options_size: usize,
    executable: *mut c_void,
});
args!(BufferFromHostArgs {
    client: *mut c_void,
    data: *const c_void,
    element_type: i32,
    dims: *const i64,
    num_dims: usize,
    byte_strides: *const i64,
    num_byte_strides: usize,
    host_buffer_semantics: i32,
    device: *mut c_void,
    memory: *mut c_void,
    device_layout: *mut c_void,
    done_with_host_buffer: *mut c_void,
    buffer: *mut c_void,
});
args!(BufferDestroyArgs { buffer: *mut c_void });
args!(BufferUnsafePointerArgs { buffer: *mut c_void, buffer_pointer: usize });
args!(BufferToHostArgs { src: *mut c_void, host_layout: *mut c_void, dst: *mut c_void, dst_size: usize, event: *mut c_void });
args!(EventArgs { event: *mut c_void });
args!(LoadedExecutableDestroyArgs { executable: *mut c_void });
args!(LoadedExecutableGetExecutableArgs { loaded_executable: *mut c_void, executable: *mut c_void });
args!(ExecutableNumOutputsArgs { executable: *mut c_void, num_outputs: usize });
args!(ExecuteOptions {
    send_callbacks: *mut c_void,
    recv_callbacks: *mut c_void,
    num_send_ops: usize,
    num_recv_ops: usize,
    launch_id: i32,
});
args!(ExecuteArgs {
    executable: *mut c_void,
    options: *const ExecuteOptions,
    argument_lists: *const *const *mut c_void,
    num_devices: usize,
    num_args: usize,
    output_lists: *const *mut *mut c_void,
    device_complete_events: *mut *mut c_void,
    execute_device: *mut c_void,
});

/// `PJRT_Buffer_Type` values for the element types we move.
pub const BUFFER_PRED: i32 = 1;
pub const BUFFER_S8: i32 = 2;
pub const BUFFER_S32: i32 = 4;
pub const BUFFER_F16: i32 = 10;
pub const BUFFER_F32: i32 = 11;
pub const BUFFER_BF16: i32 = 13;

/// `PJRT_HostBufferSemantics_kImmutableOnlyDuringCall`: the plugin copies during the call.
pub const HOST_BUFFER_IMMUTABLE_ONLY_DURING_CALL: i32 = 0;
/// `PJRT_HostBufferSemantics_kImmutableZeroCopy`: the buffer may alias the host memory, which
/// must stay valid until the plugin's done-with-host-buffer event fires.
pub const HOST_BUFFER_IMMUTABLE_ZERO_COPY: i32 = 2;
args!(LoadedExecutableDevicesArgs { executable: *mut c_void, devices: *const *mut c_void, num_devices: usize });
args!(ExecutableCodeSizeArgs { executable: *mut c_void, size_in_bytes: i64 });
args!(ExecutableCostAnalysisArgs { executable: *mut c_void, num_properties: usize, properties: *const NamedValue });

/// `PJRT_NamedValue_Type`.
pub const NAMED_VALUE_STRING: i32 = 0;
pub const NAMED_VALUE_INT64: i32 = 1;
pub const NAMED_VALUE_INT64_LIST: i32 = 2;
pub const NAMED_VALUE_FLOAT: i32 = 3;
pub const NAMED_VALUE_BOOL: i32 = 4;

/// `PJRT_NamedValue`: a name and a tagged value (the union is 8 bytes wide).
#[repr(C)]
pub struct NamedValue {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub name: *const c_char,
    pub name_size: usize,
    pub value_type: i32,
    pub value: u64,
    pub value_size: usize,
}

/// A real `CompileOptionsProto` (empty options abort some plugins): `executable_build_options
/// { num_replicas: 1, num_partitions: N }`, with `use_spmd_partitioning: true` for an SPMD
/// program (whose sharding custom calls only the partitioner removes, even over one device).
pub fn compile_options(partitions: u64, spmd: bool) -> Vec<u8> {
    let mut build = vec![0x20, 0x01, 0x28];
    push_varint(&mut build, partitions);
    if spmd {
        build.extend([0x30, 0x01]);
    }
    let mut options = vec![0x1a];
    push_varint(&mut options, build.len() as u64);
    options.extend(build);
    options
}

/// Protobuf's base-128 varint.
fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::mem::offset_of;

    #[test]
    fn spmd_options_encode_the_partition_count() {
        assert_eq!(compile_options(1, false), [0x1a, 0x04, 0x20, 0x01, 0x28, 0x01]);
        assert_eq!(compile_options(4, true), [0x1a, 0x06, 0x20, 0x01, 0x28, 0x04, 0x30, 0x01]);
        assert_eq!(compile_options(300, true), [0x1a, 0x07, 0x20, 0x01, 0x28, 0xac, 0x02, 0x30, 0x01]);
    }

    #[test]
    fn field_offsets_match_the_header() {
        assert_eq!(offset_of!(ErrorMessageArgs, message_size), 32);
        assert_eq!(offset_of!(TopologyCreateArgs, topology), 48);
        assert_eq!(offset_of!(TopologyDevicesArgs, num_descriptions), 32);
        assert_eq!(offset_of!(Program, format_size), 40);
        assert_eq!(offset_of!(CompileArgs, executable), 56);
        assert_eq!(offset_of!(BufferUnsafePointerArgs, buffer_pointer), 24);
        assert_eq!(std::mem::size_of::<NamedValue>(), 56);
        assert_eq!(offset_of!(ClientCreateArgs, client), 64);
        assert_eq!(offset_of!(ClientCompileArgs, executable), 48);
        assert_eq!(offset_of!(BufferFromHostArgs, element_type), 32);
        assert_eq!(offset_of!(BufferFromHostArgs, dims), 40);
        assert_eq!(offset_of!(BufferFromHostArgs, host_buffer_semantics), 72);
        assert_eq!(offset_of!(BufferFromHostArgs, buffer), 112);
        assert_eq!(offset_of!(BufferToHostArgs, event), 48);
        assert_eq!(offset_of!(ExecuteOptions, launch_id), 48);
        assert_eq!(offset_of!(ExecuteArgs, execute_device), 72);
    }
}
