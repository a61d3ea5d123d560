//! The Cranelift store with real Cranelift: hits give the same code, and entries of other
//! settings are never served.

use std::sync::Arc;

use cranelift_codegen::ir::{types::I64, AbiParam, Function, InstBuilder, Signature, UserFuncName};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use fncache::{Cache, CacheConfig, MemoryStore};
use fncache_cranelift::{isa_namespace, FunctionCache};

fn memory_cache() -> Cache {
    Cache::with_store(Arc::new(MemoryStore::new(64 << 20)), &CacheConfig::new())
}

fn isa(shared: &[(&str, &str)], isa_flags: &[(&str, &str)]) -> OwnedTargetIsa {
    let mut flags = settings::builder();
    for (name, value) in shared {
        flags.set(name, value).unwrap();
    }
    let mut builder = cranelift_native::builder().unwrap();
    for (name, value) in isa_flags {
        builder.set(name, value).unwrap();
    }
    builder.finish(settings::Flags::new(flags)).unwrap()
}

/// An ISA flag of the host's architecture that changes the code Cranelift may emit.
fn an_isa_flag() -> (&'static str, &'static str) {
    if cfg!(target_arch = "x86_64") {
        ("has_avx", "false")
    } else if cfg!(target_arch = "aarch64") {
        ("has_lse", "false")
    } else {
        ("", "")
    }
}

/// `f(x) = (x * k + 1) ^ (x >> 3)`, with `k` making distinct bodies.
fn function(k: i64, isa: &OwnedTargetIsa) -> Function {
    let mut signature = Signature::new(isa.default_call_conv());
    signature.params.push(AbiParam::new(I64));
    signature.returns.push(AbiParam::new(I64));
    let mut func = Function::with_name_signature(UserFuncName::user(0, k as u32), signature);
    let mut context = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut context);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let x = b.block_params(entry)[0];
    let product = b.ins().imul_imm_s(x, k);
    let sum = b.ins().iadd_imm_s(product, 1);
    let shifted = b.ins().sshr_imm_s(x, 3);
    let result = b.ins().bxor(sum, shifted);
    b.ins().return_(&[result]);
    b.finalize(isa.frontend_config());
    func
}

/// Compiles functions `ks` with `store`; returns each one's code and whether it was a hit.
fn compile_all(
    store: &mut FunctionCache,
    isa: &OwnedTargetIsa,
    ks: &[i64],
) -> Vec<(Vec<u8>, bool)> {
    ks.iter()
        .map(|&k| {
            let mut ctx = Context::for_function(function(k, isa));
            let (code, hit) = store
                .compile(&mut ctx, &**isa)
                .map_err(|e| e.inner)
                .unwrap();
            (code.code_buffer().to_vec(), hit)
        })
        .collect()
}

#[test]
fn a_second_compile_hits_and_gives_the_code_of_an_uncached_one() {
    let isa = isa(&[], &[]);
    let ks: Vec<i64> = (1..=40).collect();
    let uncached: Vec<Vec<u8>> = ks
        .iter()
        .map(|&k| {
            let mut ctx = Context::for_function(function(k, &isa));
            ctx.compile(&*isa, &mut Default::default())
                .unwrap()
                .code_buffer()
                .to_vec()
        })
        .collect();
    let cache = memory_cache();
    let first = compile_all(&mut FunctionCache::new(cache.clone(), &*isa), &isa, &ks);
    let mut again = FunctionCache::new(cache, &*isa);
    let second = compile_all(&mut again, &isa, &ks);
    assert!(first.iter().all(|(_, hit)| !hit));
    assert!(second.iter().all(|(_, hit)| *hit), "every function hits");
    assert_eq!(again.counters().hits, ks.len() as u64);
    for ((code, _), reference) in second.iter().zip(&uncached) {
        assert_eq!(code, reference, "a hit gives the uncached code");
    }
}

#[test]
fn other_optimization_levels_or_isa_flags_never_share_entries() {
    let (flag, value) = an_isa_flag();
    let base = isa(&[("opt_level", "speed")], &[]);
    let others = [
        ("opt_level none", isa(&[("opt_level", "none")], &[])),
        (
            "opt_level speed_and_size",
            isa(&[("opt_level", "speed_and_size")], &[]),
        ),
        (
            "a shared flag",
            isa(&[("opt_level", "speed"), ("enable_verifier", "false")], &[]),
        ),
        (
            "an ISA flag",
            isa(&[("opt_level", "speed")], &[(flag, value)]),
        ),
    ];
    let ks: Vec<i64> = (1..=20).collect();
    let cache = memory_cache();
    compile_all(&mut FunctionCache::new(cache.clone(), &*base), &base, &ks);
    for (what, other) in &others {
        assert_ne!(isa_namespace(&*base), isa_namespace(&**other), "{what}");
        let mut store = FunctionCache::new(cache.clone(), &**other);
        let results = compile_all(&mut store, other, &ks);
        assert_eq!(
            store.counters().hits,
            0,
            "{what}: no entry of another setting is served"
        );
        assert!(results.iter().all(|(_, hit)| !hit));
    }
    // The same settings, built again, share.
    let same = isa(&[("opt_level", "speed")], &[]);
    assert_eq!(isa_namespace(&*base), isa_namespace(&*same));
    let mut store = FunctionCache::new(cache, &*same);
    compile_all(&mut store, &same, &ks);
    assert_eq!(store.counters().hits, ks.len() as u64);
}

#[test]
#[should_panic(expected = "an ISA other than the one this store was made for")]
fn a_store_refuses_an_isa_it_was_not_made_for() {
    let speed = isa(&[("opt_level", "speed")], &[]);
    let none = isa(&[("opt_level", "none")], &[]);
    let mut store = FunctionCache::new(memory_cache(), &*speed);
    compile_all(&mut store, &none, &[1]);
}
