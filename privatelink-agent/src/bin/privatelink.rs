//! `privatelink`: the control-plane CLI (logic in `privatelink_agent::cli`).
fn main() {
    let code = privatelink_agent::cli::run(
        std::env::args(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
