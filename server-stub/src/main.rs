//! `powernode-stub`: see the library for everything it does.

fn main() -> std::process::ExitCode {
    powernode_stub::cli::main_entry()
}
