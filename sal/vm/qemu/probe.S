// probe.S: the guest ProbeAccel boots, a boot sector (assembled into
// probeSector in qemu.go; TestProbeSector_Assembles checks the bytes).
// It does what a real guest's first moments do and a broken KVM cannot: from
// real mode it builds identity page tables (64 MiB in 2 MiB pages), turns
// on PAE, sets EFER.LME with wrmsr, enables paging and protection, jumps to
// 64-bit code, writes 32 MiB of memory, runs 200 million loop iterations,
// then writes 1 to isa-debug-exit (port 0xf4), so QEMU exits with status 3.
// A working KVM does all that in well under a second; here, where /dev/kvm
// opens but real guests stall, it never reaches the port.
//
//	as --32 -o probe.o probe.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o probe.bin probe.o
.code16
.globl _start
_start:
	cli
	xor %ax, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $0x7c00, %sp
	mov $0x1000, %di
	xor %eax, %eax
	mov $0xc00, %cx
	rep stosl
	movl $0x2003, 0x1000
	movl $0x3003, 0x2000
	mov $0x3000, %di
	mov $0x83, %eax
	mov $32, %cx
1:	mov %eax, (%di)
	add $0x200000, %eax
	add $8, %di
	loop 1b
	lgdtl gdtr
	mov %cr4, %eax
	or $0x20, %eax
	mov %eax, %cr4
	mov $0x1000, %eax
	mov %eax, %cr3
	mov $0xC0000080, %ecx
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax
	mov %eax, %cr0
	ljmpl $0x08, $lm
.code64
lm:
	mov $0x1000000, %rdi
	mov $0x400000, %rcx
	xor %rax, %rax
	rep stosq
	mov $200000000, %rcx
3:	dec %rcx
	jnz 3b
	mov $1, %al
	out %al, $0xf4
2:	hlt
	jmp 2b
.p2align 3
gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF
gdtr:
	.word gdtr - gdt - 1
	.long gdt
