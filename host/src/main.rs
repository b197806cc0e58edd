//! The `wasm-pc` binary: see `wasm_pc::cli`.

fn main() -> std::process::ExitCode {
    wasm_pc::cli::main()
}
