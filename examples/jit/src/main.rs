//! A small JIT built on `cranelift-jit` that compiles through fncache.
//!
//! It generates a program of `--functions` functions over `i64` (arithmetic, shifts, a loop,
//! calls to the previous function), compiles each with Cranelift through
//! [`fncache_cranelift::define_function`], calls every one, and checks each result against an
//! interpreter of the same program. Run it twice with the same cache: the second process
//! compiles nothing and computes the same results.
//!
//! ```text
//! cargo run -p fncache-example-jit --release -- --functions 300
//! ```

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use cranelift_codegen::ir::{types::I64, AbiParam, InstBuilder, UserFuncName};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use fncache_cranelift::FunctionCache;

#[derive(Parser)]
#[command(about = "A Cranelift JIT whose compiled functions are cached by fncache")]
struct Args {
    /// How many functions to generate, compile and call.
    #[arg(long, default_value_t = 300)]
    functions: usize,
    /// Cranelift's optimization level: none, speed or speed_and_size.
    #[arg(long, default_value = "speed")]
    opt_level: String,
    /// The cache directory (default: $FNCACHE_DIR, else the user's cache directory).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

/// One generated function: `f(x) = b + (calls_previous ? f_prev(b & 0xff) : 0)` where
/// `a = x * multiplier + addend`, `b = a ^ (a >> shift)`, then `rounds` times `b = b * 3 + i`.
#[derive(Clone, Copy)]
struct Function {
    multiplier: i64,
    addend: i64,
    shift: i64,
    rounds: i64,
    calls_previous: bool,
}

fn program(count: usize) -> Vec<Function> {
    (0..count as i64)
        .map(|i| Function {
            multiplier: i.wrapping_mul(0x9e37_79b9) | 1,
            addend: i * 7 + 3,
            shift: i % 13 + 1,
            rounds: i % 5,
            calls_previous: i > 0 && i % 4 == 0,
        })
        .collect()
}

/// What the compiled code must compute.
fn interpret(program: &[Function], index: usize, x: i64) -> i64 {
    let f = program[index];
    let a = x.wrapping_mul(f.multiplier).wrapping_add(f.addend);
    let mut b = a ^ (a >> f.shift);
    for i in 0..f.rounds {
        b = b.wrapping_mul(3).wrapping_add(i);
    }
    if f.calls_previous {
        b = b.wrapping_add(interpret(program, index - 1, b & 0xff));
    }
    b
}

fn isa(opt_level: &str) -> Result<OwnedTargetIsa> {
    let mut flags = settings::builder();
    flags.set("opt_level", opt_level)?;
    // As `JITBuilder::new` sets them: long-range relocations, no PIC.
    flags.set("use_colocated_libcalls", "false")?;
    flags.set("is_pic", "false")?;
    let isa = cranelift_native::builder()
        .map_err(|message| anyhow::anyhow!("this host is not supported: {message}"))?
        .finish(settings::Flags::new(flags))?;
    Ok(isa)
}

/// Builds function `index`'s body in `ctx.func`.
fn build(module: &mut JITModule, ids: &[FuncId], f: Function, index: usize, ctx: &mut Context) {
    let mut builder_context = FunctionBuilderContext::new();
    ctx.func.signature = signature(module);
    ctx.func.name = UserFuncName::user(0, ids[index].as_u32());
    let previous = f
        .calls_previous
        .then(|| module.declare_func_in_func(ids[index - 1], &mut ctx.func));
    let frontend = module.isa().frontend_config();
    let mut b = FunctionBuilder::new(&mut ctx.func, &mut builder_context);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let x = b.block_params(entry)[0];
    let a = b.ins().imul_imm_s(x, f.multiplier);
    let a = b.ins().iadd_imm_s(a, f.addend);
    let shifted = b.ins().sshr_imm_s(a, f.shift);
    let mut value = b.ins().bxor(a, shifted);
    for i in 0..f.rounds {
        let tripled = b.ins().imul_imm_s(value, 3);
        value = b.ins().iadd_imm_s(tripled, i);
    }
    if let Some(previous) = previous {
        let low = b.ins().band_imm_s(value, 0xff);
        let call = b.ins().call(previous, &[low]);
        let result = b.inst_results(call)[0];
        value = b.ins().iadd(value, result);
    }
    b.ins().return_(&[value]);
    b.finalize(frontend);
}

fn signature(module: &JITModule) -> cranelift_codegen::ir::Signature {
    let mut signature = module.make_signature();
    signature.params.push(AbiParam::new(I64));
    signature.returns.push(AbiParam::new(I64));
    signature
}

fn main() -> Result<()> {
    let args = Args::parse();
    let program = program(args.functions);

    let mut config = fncache::CacheConfig::new();
    if let Some(dir) = &args.cache_dir {
        config = config.directory(dir);
    }
    let cache = fncache::Cache::open(&config).context("cannot open the cache")?;
    let isa = isa(&args.opt_level)?;
    let mut functions = FunctionCache::new(cache, &*isa);
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));

    let start = Instant::now();
    let mut ids = Vec::with_capacity(program.len());
    for i in 0..program.len() {
        let signature = signature(&module);
        ids.push(module.declare_function(&format!("f{i}"), Linkage::Local, &signature)?);
    }
    let mut ctx = module.make_context();
    for (index, f) in program.iter().enumerate() {
        build(&mut module, &ids, *f, index, &mut ctx);
        fncache_cranelift::define_function(&mut module, ids[index], &mut ctx, &mut functions)
            .with_context(|| format!("cannot compile f{index}"))?;
        module.clear_context(&mut ctx);
    }
    module.finalize_definitions()?;
    let compile_seconds = start.elapsed().as_secs_f64();

    let mut checksum = 0u64;
    for (index, id) in ids.iter().enumerate() {
        let code = module.get_finalized_function(*id);
        // SAFETY: `f{index}` was declared and defined with the signature `fn(i64) -> i64`,
        // in the platform's default calling convention.
        let f = unsafe { std::mem::transmute::<*const u8, extern "C" fn(i64) -> i64>(code) };
        let x = index as i64 * 31 + 5;
        let (got, expected) = (f(x), interpret(&program, index, x));
        if got != expected {
            bail!("f{index}({x}) returned {got}, the interpreter says {expected}");
        }
        checksum = checksum.rotate_left(5) ^ got as u64;
    }
    functions
        .flush()
        .context("cannot store the compiled code")?;

    let counters = functions.counters();
    let compiled = counters.lookups - counters.hits;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "functions": program.len(), "lookups": counters.lookups, "hits": counters.hits,
                "compiled": compiled, "inserts": counters.inserts,
                "compile_seconds": compile_seconds, "checksum": format!("{checksum:016x}"),
            })
        );
    } else {
        println!(
            "{} functions in {:.1} ms: {} from the cache, {compiled} compiled; all results \
             match the interpreter (checksum {checksum:016x})",
            program.len(),
            compile_seconds * 1e3,
            counters.hits,
        );
    }
    // SAFETY: nothing calls into the module's code any more.
    unsafe { module.free_memory() };
    Ok(())
}
