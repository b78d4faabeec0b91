fn main() -> std::process::ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { segattn::configure_runtime() };
    segattn::cli::main()
}
