/*
 * The demo guest (demo.S) as a standalone PVH ELF that any VMM with PVH boot runs: tern
 * (`--kernel demo-pvh.elf`) and QEMU (`-kernel demo-pvh.elf`). Written out with its options by
 * `tern --write-demo-elf PATH --guest demo,...` (vmm/src/demo/elf.rs patches the config block below).
 *
 * The loader enters `pvh_start` in 32-bit protected mode with paging off and EBX = hvm_start_info.
 * From there the guest builds what tern's demo loader builds (vmm/src/demo/setup.rs, same addresses):
 * identity page tables for the low 4 GiB (2 MiB pages, user-accessible), the GDT (kernel/user
 * code/data, one TSS), the IDT from demo.S's exception stubs, the parameter block for one vCPU;
 * then it drops to ring 3 like demo.S's entry64. Before demo.S's ring-3 loop starts, ring 3 clears
 * any non-zero word of the generation table (firmware may have used that memory; zero pages stay
 * untouched) and writes every page of the working set once (generation 1), so that an idle guest
 * (dirty-mib-per-s=0) still has its working set's bytes to migrate. Only the boot vCPU runs the demo
 * (ncpus = 1). Power-off (SYS_POWER_OFF, exit-after=S) uses tern's sleep-control port; elsewhere
 * the vCPU just halts.
 */
        .intel_syntax noprefix
        .include "demo.S"

        .set PT_PML4,        0x30000   /* PML4, PDPT, 4 PDs: 0x30000..0x36000 */
        .set PT_PDPT,        0x31000
        .set PT_PD,          0x32000
        .set IDT_GPA,        0x11000
        .set TSS_GPA,        0x12000
        .set PARAMS_GPA,     0x20000
        .set STACKS_GPA,     0x200000
        .set KSTACK_TOP,     0x201000  /* vCPU 0: 4 KiB kernel stack, then its user stack */
        .set USTACK_TOP,     0x204000
        .set GEN_TABLE_GPA,  0x800000
        .set HVM_MEMMAP_PADDR, 0x28
        .set HVM_MEMMAP_ENTRIES, 0x30

/* The config block tern patches (vmm/src/demo/elf.rs): magic, version, then u64 fields. */
        .data
        .balign 8
pvh_config:
        .ascii "TERNPVHC"
        .quad 1                         /* version */
cfg_mib:        .quad 64
cfg_dirty:      .quad 16                /* MiB/s */
cfg_exit_s:     .quad 0                 /* 0 = run until stopped */
cfg_tsc_khz:    .quad 0                 /* the guest's TSC rate; 0 = unknown (refused) */

        .balign 16
pvh_gdt:
        .quad 0
        .quad 0x00af9b000000ffff        /* 0x08 kernel code (long mode) */
        .quad 0x00cf93000000ffff        /* 0x10 kernel data */
        .quad 0x00cff3000000ffff        /* 0x18 user data (0x1b) */
        .quad 0x00affb000000ffff        /* 0x20 user code (0x23) */
        .quad 0x0000890120000067        /* 0x28 TSS at TSS_GPA, limit 103 */
        .quad 0
pvh_gdt_end:
pvh_gdtr:
        .word pvh_gdt_end - pvh_gdt - 1
        .long pvh_gdt

        .section .rodata
msg_pvh_tsc:    .asciz "DEMO: FAULT no TSC rate in the ELF's config block\n"
msg_pvh_fit:    .asciz "DEMO: FAULT the working set does not fit in one RAM range of the memory map\n"

        .section .note.Xen, "a", @note
        .balign 4
        .long 4                         /* name size */
        .long 8                         /* desc size */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .quad pvh_start

        .text
        .code32
        .globl pvh_start
pvh_start:
        cli
        mov esp, KSTACK_TOP             /* PVH gives no stack */
        mov esi, ebx                    /* hvm_start_info, kept for the memory-map check */
        /* identity map 0..4 GiB with 2 MiB user pages */
        mov dword ptr [PT_PML4], PT_PDPT + 7
        mov dword ptr [PT_PML4 + 4], 0
        xor ecx, ecx
1:      lea eax, [ecx * 8 + PT_PDPT]
        mov edx, ecx
        shl edx, 12
        add edx, PT_PD + 7
        mov [eax], edx
        mov dword ptr [eax + 4], 0
        inc ecx
        cmp ecx, 4
        jb 1b
        xor ecx, ecx
2:      mov eax, ecx
        shl eax, 21
        or eax, 0x87                    /* present, writable, user, 2 MiB */
        mov [ecx * 8 + PT_PD], eax
        mov dword ptr [ecx * 8 + PT_PD + 4], 0
        inc ecx
        cmp ecx, 2048
        jb 2b
        mov eax, cr4
        or eax, 0x20                    /* PAE */
        mov cr4, eax
        mov eax, PT_PML4
        mov cr3, eax
        mov ecx, 0xc0000080             /* EFER.LME */
        rdmsr
        or eax, 0x100
        wrmsr
        lgdt [pvh_gdtr]
        mov eax, cr0
        or eax, 0x80000001              /* PG, PE */
        mov cr0, eax
        push 0x08
        push offset pvh_start64
        retf

        .code64
pvh_start64:
        mov eax, 0x10
        mov ds, eax
        mov es, eax
        mov ss, eax
        mov fs, eax
        mov gs, eax
        mov rsp, KSTACK_TOP
        mov r12, rsi                    /* hvm_start_info */

        /* TSS: RSP0 = kernel stack, no I/O bitmap */
        xor eax, eax
        mov ecx, 13
        mov rdi, TSS_GPA
        rep stosq
        mov rax, KSTACK_TOP
        mov [TSS_GPA + 4], rax
        mov word ptr [TSS_GPA + 102], 104
        mov eax, 0x28
        ltr ax

        /* IDT: vectors 0..31 from demo.S's stub table, DPL 0 interrupt gates */
        lea rsi, [rip + exception_stubs]
        mov rdi, IDT_GPA
        xor ecx, ecx
1:      mov rax, [rsi + rcx * 8]
        mov rdx, rax
        and edx, 0xffff
        or rdx, 0x08 << 16              /* kernel code */
        mov r8, 0x8e
        shl r8, 40
        or rdx, r8
        mov r8, rax
        shr r8, 16
        and r8, 0xffff
        shl r8, 48
        or rdx, r8
        mov [rdi], rdx
        shr rax, 32
        mov [rdi + 8], rax
        add rdi, 16
        inc ecx
        cmp ecx, 32
        jb 1b
        sub rsp, 16
        mov word ptr [rsp], 32 * 16 - 1
        mov qword ptr [rsp + 2], IDT_GPA
        lidt [rsp]
        add rsp, 16

        /* parameters: r8 = tsc_hz, r9 = pages, r10 = working-set base */
        mov rax, [rip + cfg_tsc_khz]
        test rax, rax
        jz pvh_no_tsc
        imul r8, rax, 1000
        mov r9, [rip + cfg_mib]
        shl r9, 8
        lea r10, [r9 * 4 + GEN_TABLE_GPA + 0x1fffff]
        and r10, -0x200000
        /* the working set must lie inside one RAM range of the PVH memory map (when one is given) */
        cmp dword ptr [r12 + 4], 1      /* start_info version 1 has the memory map */
        jb 3f
        mov ecx, [r12 + HVM_MEMMAP_ENTRIES]
        test ecx, ecx
        jz 3f
        mov r11, r9
        shl r11, 12
        add r11, r10                    /* end of the working set */
        mov eax, [r12 + HVM_MEMMAP_PADDR]
2:      cmp dword ptr [rax + 16], 1     /* RAM */
        jne 4f
        cmp qword ptr [rax], GEN_TABLE_GPA
        ja 4f
        mov rdx, [rax]
        add rdx, [rax + 8]
        cmp rdx, r11
        jae 3f
4:      add rax, 24
        dec ecx
        jnz 2b
        lea rsi, [rip + msg_pvh_fit]
        jmp pvh_fail

3:      mov rdi, PARAMS_GPA
        mov rax, 0x4f4d45444e524554    /* "TERNDEMO" */
        mov [rdi + P_MAGIC], rax
        mov qword ptr [rdi + P_NCPUS], 1
        mov [rdi + P_WS_BASE], r10
        mov qword ptr [rdi + P_GEN_TABLE], GEN_TABLE_GPA
        mov rax, [rip + cfg_exit_s]
        imul rax, r8
        mov [rdi + P_EXIT_TICKS], rax
        mov [rdi + P_TSC_HZ], r8
        xor eax, eax
        mov [rdi + P_LOCK], rax
        mov [rdi + P_CORRUPT], rax
        mov [rdi + P_LINE_LEN], rax
        mov [rdi + P_DEV + D_STATE], rax
        lea rdx, [rdi + P_SLOTS]        /* vCPU 0's slot */
        mov ecx, SLOT_SIZE / 8
1:      mov qword ptr [rdx + rcx * 8 - 8], 0
        dec ecx
        jnz 1b
        mov qword ptr [rdx + S_USTACK], USTACK_TOP
        mov qword ptr [rdx + S_FIRST], 0
        mov [rdx + S_COUNT], r9
        mov rcx, [rip + cfg_dirty]
        shl rcx, 8                      /* pages per second */
        xor eax, eax
        test rcx, rcx
        jz 1f
        mov rax, r8
        xor edx, edx
        div rcx
        test rax, rax
        jnz 1f
        inc eax
1:      mov [rdi + P_SLOTS + S_TPW], rax

        /* to ring 3: pvh_user clears the generation table, then demo.S's user_main */
        xor esi, esi                    /* vCPU 0 */
        push USER_SS
        push USTACK_TOP
        push 0x0002
        push USER_CS
        lea rax, [rip + pvh_user]
        push rax
        iretq

pvh_no_tsc:
        lea rsi, [rip + msg_pvh_tsc]
pvh_fail:
        call kputs
        cli
1:      hlt
        jmp 1b

/* ring 3, rdi = params, rsi = vCPU index: zero the generation table's non-zero words, fill the
 * working set, then demo.S's loop */
pvh_user:
        mov r8, [rdi + P_GEN_TABLE]
        mov rcx, [rdi + P_SLOTS + S_COUNT]
        lea rcx, [r8 + rcx * 4]
1:      cmp r8, rcx
        jae 3f
        cmp qword ptr [r8], 0
        je 2f
        mov qword ptr [r8], 0
2:      add r8, 8
        jmp 1b
3:      /* every page of the working set once (generation 1): even an idle guest has data to move */
        mov r15, rdi
        mov r12, [rdi + P_SLOTS + S_FIRST]
        mov rbx, [rdi + P_SLOTS + S_COUNT]
        xor r13d, r13d
4:      cmp r13, rbx
        jae 5f
        mov rax, r13
        call write_page
        inc r13
        jmp 4b
5:      mov rdi, r15
        xor esi, esi
        jmp user_main
