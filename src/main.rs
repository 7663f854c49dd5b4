fn main() -> std::process::ExitCode {
    sitesync::cli::main()
}
