//! Rust bindings for the two worlds in `wit/`, generated at build time.
//!
//! The consumer world generates the shared import interfaces; the producer
//! world reuses them, so one host implementation serves both.

mod consumer_world {
    wasmtime::component::bindgen!({
        world: "consumer",
        path: "../wit",
        imports: {
            "wasm-pc:app/outbound.send": async,
            "wasm-pc:app/outbound.send-batch": async,
            default: trappable,
        },
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}

mod producer_world {
    wasmtime::component::bindgen!({
        world: "producer",
        path: "../wit",
        with: {
            "wasm-pc:app/types": super::consumer_world::wasm_pc::app::types,
            "wasm-pc:app/outbound": super::consumer_world::wasm_pc::app::outbound,
            "wasm-pc:app/log": super::consumer_world::wasm_pc::app::log,
            "wasm-pc:app/config": super::consumer_world::wasm_pc::app::config,
        },
        exports: { default: async },
    });
}

pub use consumer_world::wasm_pc::app::{config, log, outbound, types};
pub use consumer_world::{Consumer, ConsumerPre};
pub use producer_world::{Producer, ProducerPre};

/// The fully qualified name of the interface each world exports. Guests
/// built against an older 0.1.x WIT export an older version of it; lookups
/// go by semver compatibility, as wasmtime's do.
pub const CONSUME_EXPORT: &str = "wasm-pc:app/consume@0.1.2";
/// See [`CONSUME_EXPORT`].
pub const PRODUCE_EXPORT: &str = "wasm-pc:app/produce@0.1.2";
