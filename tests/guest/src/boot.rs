//! Entry from the Linux 64-bit boot protocol and everything that runs at CPL0.
//!
//! On the nested KVM this guest is made for (`kvm_pvm`), guest kernel mode
//! (CPL0) runs through KVM's instruction emulator: slowly (~1.6 M
//! instructions/s) and with no SSE, `cmpxchg16b`, `xrstor` or `int3`. So CPL0
//! code here is a handful of hand-written, integer-only instructions and no
//! Rust:
//!
//! * `_start`: load our GDT (with a 64-bit TSS whose `rsp0` is the interrupt
//!   stack and whose I/O permission bitmap allows every port), IDT and
//!   identity page tables (all user-accessible), enable SSE for user mode
//!   (`CR4.OSFXSR|OSXMMEXCPT`, `CR0.MP`, clear `CR0.EM|TS`) and `iretq` to
//!   CPL3. The tables are assembled in `.data`, including the TSS descriptor
//!   (computed by `link.ld`), so this is ~25 instructions.
//! * interrupt stubs (one 16-byte stub per vector): count the vector in
//!   [`ferro_irq_counts`], write the local APIC EOI, `iretq`.
//! * exception stubs: record vector, error code, `rip`, `cr2` and `iretq` to
//!   `ferro_fault_entry` (fault.rs) at CPL3, which prints them and resets.
//! * AP startup (see smp.rs): a 4-instruction real-mode trampoline (copied
//!   below 1 MiB) that loads our GDT and enters 32-bit protected mode, then
//!   `ferro_ap_entry32`/`ferro_ap_entry64`: long mode on our page tables,
//!   our IDT, the AP's own TSS and stacks, `iretq` to `ferro_ap_main` at
//!   CPL3. ~30 instructions in all.
//! * the syscall gate (`ud2` at a known address, see `ferro_sys_gate`): the
//!   few privileged operations Rust code asks for
//!   ([`halt`], [`rdmsr`], [`wrmsr`], [`enable_interrupts`],
//!   [`disable_interrupts`]).
//!
//! Port I/O at CPL3 goes through the TSS I/O bitmap: `kvm_pvm` does not honour
//! `RFLAGS.IOPL=3` (an `out` at CPL3 raises #GP), nor `int 0x80` from CPL3
//! (#UD), hence the bitmap and `syscall`. `cli`/`sti` are privileged at CPL3
//! too, so they are syscalls.
//!
//! The first user-mode instructions (`ferro_user_entry`) print the `hello`
//! line (the boot-time mark), zero `.bss` and call `ferro_main`.

use core::arch::{asm, global_asm};

/// Selector of the CPL0 code segment (same as the boot protocol's).
pub const KERNEL_CS: u16 = 0x10;

/// Spurious-interrupt vector programmed into the local APIC (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// `syscall` function: `sti; hlt` until the next interrupt.
const SYS_HALT: u64 = 0;
/// `syscall` function: `rdmsr`.
const SYS_RDMSR: u64 = 1;
/// `syscall` function: `wrmsr`.
const SYS_WRMSR: u64 = 2;
/// `syscall` function: return to CPL3 with interrupts enabled.
const SYS_STI: u64 = 3;
/// `syscall` function: return to CPL3 with interrupts disabled.
const SYS_CLI: u64 = 4;

/// One interrupt count per vector, incremented by the CPL0 stubs.
#[no_mangle]
pub static mut ferro_irq_counts: [u64; 256] = [0; 256];

/// Non-zero when the local APIC is in x2APIC mode (EOI through MSR 0x80b);
/// otherwise the stubs write the xAPIC EOI register at 0xfee000b0.
#[no_mangle]
pub static mut ferro_x2apic: u8 = 0;

/// Set by the first exception; a second one (a fault in the fault path)
/// resets the machine from CPL0 straight away.
#[no_mangle]
static mut ferro_in_fault: u8 = 0;

/// One IDT gate descriptor (long mode, 16 bytes).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

/// The IDT, loaded by `_start` and filled by [`init_idt`] from CPL3 (the
/// page tables make every page user-accessible; only stub addresses, which
/// are link-time relocations, have to be split into gate fields at run time).
#[repr(C, align(4096))]
struct Idt([Gate; 256]);

#[no_mangle]
static mut ferro_idt: Idt = Idt(
    [Gate { offset_lo: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_hi: 0, reserved: 0 };
        256],
);

extern "C" {
    /// The first of 256 interrupt stubs, 16 bytes apart.
    static ferro_isr_stubs: [u8; 16 * 256];
}

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start
    .type _start, @function
// CPL0, interrupts off, %rsi = boot_params.
_start:
    cli
    lgdt ferro_gdt_ptr(%rip)
    lidt ferro_idt_ptr(%rip)
    lea ferro_pml4(%rip), %rax
    mov %rax, %cr3
    mov %cr4, %rax
    or $0x600, %rax                 // OSFXSR | OSXMMEXCPT
    mov %rax, %cr4
    mov %cr0, %rax
    and $~0xc, %rax                 // clear EM, TS
    or $0x2, %rax                   // set MP
    mov %rax, %cr0
    mov $0x30, %ax
    ltr %ax
    mov %rsi, %rdi                  // boot_params: first argument at CPL3
    pushq $0x23                     // SS: user data, RPL 3
    lea ferro_user_stack_top(%rip), %rax
    push %rax                       // RSP
    pushq $0x0002                   // RFLAGS: IF=0 (ports: TSS I/O bitmap)
    pushq $0x2b                     // CS: user code, RPL 3
    lea ferro_user_entry(%rip), %rax
    push %rax                       // RIP
    iretq

// CPL3 from here on.
ferro_user_entry:
    mov %rdi, %r12
    lea ferro_hello(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    cld
    rep stosb
    mov %r12, %rdi
    call ferro_main
    ud2

    .section .rodata.ferro_hello, "a"
ferro_hello:
    .asciz "ferro-guest: hello\n"

// ---------------------------------------------------------------- CPL0 stubs
    .section .text.ferro_isr, "ax"
    .balign 16
    .global ferro_isr_stubs
ferro_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if vec == 6
      jmp ferro_ud_entry            // #UD: maybe the syscall gate
    .elseif vec < 32
      .if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
        pushq $vec                  // the CPU pushed an error code
      .else
        pushq $0
        pushq $vec
      .endif
      jmp ferro_exception_common
    .elseif vec == 0xff
      incq ferro_irq_counts+8*vec(%rip)
      iretq                         // spurious: no EOI
    .else
      incq ferro_irq_counts+8*vec(%rip)
      jmp ferro_irq_common
    .endif
    .set vec, vec + 1
    .endr

// Interrupt: EOI to the local APIC, return.
ferro_irq_common:
    push %rax
    push %rcx
    push %rdx
    cmpb $0, ferro_x2apic(%rip)
    je 1f
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    jmp 2f
1:  movabs $0xfee000b0, %rax
    movl $0, (%rax)
2:  pop %rdx
    pop %rcx
    pop %rax
    iretq

// Exception: stack = vector, error, rip, cs, rflags, rsp, ss. Rewrite the
// frame to enter ferro_fault_entry(vector, error, rip, cr2) at CPL3.
ferro_exception_common:
    cmpb $0, ferro_in_fault(%rip)
    jne 9f
    movb $1, ferro_in_fault(%rip)
    pop %rdi
    pop %rsi
    mov (%rsp), %rdx
    mov %cr2, %rcx
    lea ferro_fault_entry(%rip), %rax
    mov %rax, (%rsp)
    movq $0x2b, 8(%rsp)
    movq $0x0002, 16(%rsp)
    lea ferro_fault_stack_top(%rip), %rax
    sub $8, %rax                    // as if called: rsp % 16 == 8
    mov %rax, 24(%rsp)
    movq $0x23, 32(%rsp)
    iretq
9:  mov $0xfe, %al                  // fault while faulting: reset
    out %al, $0x64
8:  cli
    hlt
    jmp 8b

// Syscall gate. CPL3 calls ferro_sys_gate with %rax = function and
// %rdi/%rsi = arguments; its `ud2` raises #UD, which kvm_pvm delivers to
// CPL0 like any exception (it does not give CPL0 to `syscall`, and turns
// `int 0x80` into #UD). The #UD stub recognises the gate's address, runs
// the function and returns past the `ud2`; result in %rax.
    .global ferro_sys_gate
ferro_sys_gate:
ferro_sys_ud2:
    ud2
    ret

// #UD: stack = rip, cs, rflags, rsp, ss.
ferro_ud_entry:
    push %rcx
    lea ferro_sys_ud2(%rip), %rcx
    cmp %rcx, 8(%rsp)
    pop %rcx
    je 1f
    pushq $0                        // not the gate: a real #UD
    pushq $6
    jmp ferro_exception_common
1:  addq $2, (%rsp)                 // resume after the ud2
    cmp $0, %rax
    je 2f
    cmp $1, %rax
    je 3f
    cmp $2, %rax
    je 4f
    cmp $3, %rax
    je 5f
    cmp $4, %rax
    je 6f
    mov $-1, %rax
    iretq
2:  sti                             // SYS_HALT: wait for an interrupt
    hlt
    iretq
3:  mov %edi, %ecx                  // SYS_RDMSR
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    iretq
4:  mov %edi, %ecx                  // SYS_WRMSR
    mov %esi, %eax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    iretq
5:  orq $0x200, 16(%rsp)            // SYS_STI: return with IF=1
    iretq
6:  andq $~0x200, 16(%rsp)          // SYS_CLI: return with IF=0
    iretq

// ---------------------------------------------------------------- AP startup
// The real-mode trampoline, copied by smp.rs to a page below 1 MiB: a
// STARTUP IPI with vector V starts an AP there with CS = V << 8, IP = 0.
// It loads our GDT (the 6-byte GDTR below; its 0x08 is flat 32-bit code),
// sets CR0.PE (clearing CD/NW left by INIT) and jumps to 32-bit code in the
// image. Only these 4 instructions have to be below 1 MiB; with the 32- and
// 64-bit parts an AP runs 29 emulated instructions to reach CPL3.
    .section .rodata.ferro_ap_tramp, "a"
    .global ferro_ap_tramp
    .global ferro_ap_tramp_end
    .code16
ferro_ap_tramp:
    lgdtl %cs:(ferro_ap_tramp_gdtr - ferro_ap_tramp)
    mov $0x33, %eax                 // PE | MP | ET | NE
    mov %eax, %cr0
    ljmpl $0x08, $ferro_ap_entry32
    .balign 4
ferro_ap_tramp_gdtr:
    .word ferro_gdt_end - ferro_gdt - 1
    .long ferro_gdt
ferro_ap_tramp_end:

// 32-bit protected mode, flat, paging off, interrupts off since INIT: long
// mode on the BSP's page tables, with the BSP's CR4 bits (SSE for CPL3).
    .section .text.ferro_ap, "ax"
    .code32
ferro_ap_entry32:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %ss
    mov $0x620, %eax                // PAE | OSFXSR | OSXMMEXCPT
    mov %eax, %cr4
    mov $ferro_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           // IA32_EFER
    rdmsr
    or $0x100, %eax                 // LME
    wrmsr
    mov $0x80000033, %eax           // PG | PE | MP | ET | NE
    mov %eax, %cr0
    ljmp $0x10, $ferro_ap_entry64
    .code64
// 64-bit, CPL0: our IDT, this AP's TSS and stacks (ferro_ap_boot, written by
// the BSP before the STARTUP IPI; one AP starts at a time), then CPL3 at
// ferro_ap_main(slot) like the BSP.
ferro_ap_entry64:
    lidt ferro_idt_ptr(%rip)
    mov ferro_ap_boot(%rip), %rsp       // kernel stack (also the TSS's rsp0)
    ltr ferro_ap_boot+24(%rip)
    mov ferro_ap_boot+16(%rip), %rdi    // slot
    pushq $0x23                     // SS: user data, RPL 3
    pushq ferro_ap_boot+8(%rip)     // RSP: the AP's user stack
    pushq $0x0002                   // RFLAGS: IF=0
    pushq $0x2b                     // CS: user code, RPL 3
    lea ferro_ap_main(%rip), %rax
    push %rax                       // RIP
    iretq

// ---------------------------------------------------------------- tables
    .section .data.pagetables, "aw"
    .balign 4096
// Identity map of the first 4 GiB with 2 MiB pages, user-accessible; the
// device hole from 3 GiB (PCI BARs, ECAM, IOAPIC, LAPIC) uncached.
ferro_pml4:
    .quad ferro_pdpt + 0x7
    .fill 511, 8, 0
ferro_pdpt:
    .quad ferro_pd + 0x7
    .quad ferro_pd + 0x1007
    .quad ferro_pd + 0x2007
    .quad ferro_pd + 0x3007
    .fill 508, 8, 0
ferro_pd:
    .set i, 0
    .rept 2048
    .if i >= 1536
      .quad (i << 21) | 0x9f        // P RW U PWT PCD PS
    .else
      .quad (i << 21) | 0x87        // P RW U PS
    .endif
    .set i, i + 1
    .endr

    .section .data.ferro_gdt, "aw"
    .balign 16
ferro_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        // 0x08 kernel code, 32-bit (AP startup)
    .quad 0x00af9a000000ffff        // 0x10 kernel code, 64-bit
    .quad 0x00cf92000000ffff        // 0x18 kernel data
    .quad 0x00cff2000000ffff        // 0x20 user data, DPL 3
    .quad 0x00affa000000ffff        // 0x28 user code, 64-bit, DPL 3
    .quad __tss_desc_lo             // 0x30 TSS (see link.ld)
    .quad __tss_desc_hi
    .global ferro_gdt_ap_tss
ferro_gdt_ap_tss:
    .fill 2 * {max_aps}, 8, 0           // 0x40.. one TSS per AP, filled by smp.rs
ferro_gdt_end:
    .balign 8
    .word 0, 0, 0
ferro_gdt_ptr:
    .word ferro_gdt_end - ferro_gdt - 1
    .quad ferro_gdt
    .word 0, 0, 0
ferro_idt_ptr:
    .word 256 * 16 - 1
    .quad ferro_idt

// The APs' TSSes ({ap_tss_stride} bytes apart, filled by smp.rs) lie just
// below the BSP's so that their I/O map base (a 16-bit offset) can point at
// the BSP's bitmap: every CPU shares the one "all ports allowed" bitmap.
    .balign 16
    .global ferro_ap_tss
ferro_ap_tss:
    .fill {max_aps} * {ap_tss_stride}, 1, 0
    .balign 16
    .global ferro_tss
ferro_tss:
    .long 0
    .quad ferro_kernel_stack_top    // rsp0: interrupt stack
    .quad 0, 0, 0                   // rsp1, rsp2, reserved
    .fill 7, 8, 0                   // ist1..ist7
    .quad 0
    .word 0
    .word 104                       // I/O permission bitmap follows
    .fill 8192, 1, 0                // every port allowed at CPL3
    .byte 0xff

// ---------------------------------------------------------------- stacks
    .section .stacks, "aw", @nobits
    .balign 4096
    .space 16384
ferro_kernel_stack_top:
    .space 16384
ferro_fault_stack_top:
    .space 131072
ferro_user_stack_top:
// Per AP: {ap_kernel_stack} bytes of CPL0 stack, then its CPL3 stack, {ap_stack} in all.
    .balign 4096
    .global ferro_ap_stacks
ferro_ap_stacks:
    .space {max_aps} * {ap_stack}
    .text
"#,
    max_aps = const crate::smp::MAX_APS,
    ap_tss_stride = const crate::smp::AP_TSS_STRIDE,
    ap_stack = const crate::smp::AP_STACK,
    ap_kernel_stack = const crate::smp::AP_KERNEL_STACK,
    options(att_syntax)
);

/// Fills the IDT: every vector is a CPL0-only interrupt gate.
pub fn init_idt() {
    let base = core::ptr::addr_of!(ferro_isr_stubs) as u64;
    for vector in 0..256usize {
        let handler = base + 16 * vector as u64;
        let gate = Gate {
            offset_lo: handler as u16,
            selector: KERNEL_CS,
            ist: 0,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: single-threaded, interrupts are still disabled, and the
        // IDT is only read by the CPU when a vector is delivered.
        unsafe { core::ptr::addr_of_mut!(ferro_idt.0[vector]).write_volatile(gate) };
    }
}

/// How many times `vector` has been delivered.
pub fn irq_count(vector: u8) -> u64 {
    // SAFETY: an aligned u64 written only by the interrupt stubs (one
    // instruction, on this CPU); a volatile read sees the latest value.
    unsafe { core::ptr::addr_of!(ferro_irq_counts[vector as usize]).read_volatile() }
}

/// Tells the interrupt stubs to EOI through the x2APIC MSR.
pub fn set_x2apic_eoi(x2apic: bool) {
    // SAFETY: a byte read by the stubs; written before interrupts are enabled.
    unsafe { core::ptr::addr_of_mut!(ferro_x2apic).write_volatile(x2apic as u8) };
}

// The gate is reached with `call`, so none of these asm blocks says
// `nostack`: the compiler then keeps the red zone free.

/// Enables interrupts at CPL3 (the stub returns with `RFLAGS.IF` set).
pub fn enable_interrupts() {
    // SAFETY: the IDT and the APIC are set up before anyone calls this; the
    // gate clobbers only %rax.
    unsafe { asm!("call ferro_sys_gate", inout("rax") SYS_STI => _) };
}

/// Disables interrupts at CPL3.
pub fn disable_interrupts() {
    // SAFETY: as for `enable_interrupts`.
    unsafe { asm!("call ferro_sys_gate", inout("rax") SYS_CLI => _) };
}

/// Waits for the next interrupt: `sti; hlt` at CPL0.
pub fn halt() {
    // SAFETY: the gate only executes `sti; hlt; iretq`; the interrupt
    // that wakes it touches memory (counters), hence no `nomem`.
    unsafe { asm!("call ferro_sys_gate", inout("rax") SYS_HALT => _) };
}

/// Reads a model-specific register (CPL0 through the gate).
pub fn rdmsr(msr: u32) -> u64 {
    let value: u64;
    // SAFETY: the stub executes `rdmsr` for the MSR in %edi; it clobbers
    // %rcx and %rdx. An unknown MSR raises #GP, reported as a fault.
    unsafe {
        asm!("call ferro_sys_gate", inout("rax") SYS_RDMSR => value, in("rdi") msr as u64,
             out("rcx") _, out("rdx") _);
    }
    value
}

/// Writes a model-specific register (CPL0 through the gate).
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the stub executes `wrmsr` for the MSR in %edi with %rsi as the
    // value; it clobbers %rax, %rcx and %rdx.
    unsafe {
        asm!("call ferro_sys_gate", inout("rax") SYS_WRMSR => _, in("rdi") msr as u64, in("rsi") value,
             out("rcx") _, out("rdx") _);
    }
}
