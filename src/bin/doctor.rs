//! `cargo run --release --bin attention-doctor`: prints [`attention::report()`], everything a bug
//! report needs (like `vllm collect-env`), ending with a warm, checked attention run. Your
//! program can log the same report (`attention::report()`, or `.to_json()`); it reflects that
//! program's build: its features, arch list and nvcc. `--json` prints the JSON instead.

fn main() {
    let report = attention::report();
    if std::env::args().any(|a| a == "--json") {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    if let Some(run) = &report.run {
        if !run.ok() {
            std::process::exit(1);
        }
    }
}
