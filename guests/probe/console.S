/*
 * Console helpers shared by the probe kernels (included with `.include "console.S"`): ring-0
 * writes to COM1, no LSR polling (tern's UART is always ready to transmit).
 */

/* eax printed as ecx hex digits (most significant first); rcx is preserved */
hex:
        push rcx
        mov r8d, eax
        mov r9d, ecx
1:      dec r9d
        mov eax, r8d
        lea ecx, [r9 * 4]
        shr eax, cl
        and eax, 0xf
        cmp al, 10
        jb 2f
        add al, 'a' - 10
        jmp 3f
2:      add al, '0'
3:      call putc
        test r9d, r9d
        jnz 1b
        pop rcx
        ret

/* al to COM1 */
putc:
        push rdx
        mov dx, 0x3f8
        out dx, al
        pop rdx
        ret

/* NUL-terminated string at rsi to COM1 */
puts:
        mov al, [rsi]
        test al, al
        jz 1f
        call putc
        inc rsi
        jmp puts
1:      ret
