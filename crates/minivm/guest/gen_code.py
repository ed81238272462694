# Regenerates ../src/guest/code.rs from the .S files (needs binutils; not part of the build):
#   as --64 -o tg.o testguest.S && as --32 -o bi.o bootinc.S && ld -m elf_i386 -Ttext=0 --oformat binary -o bi.bin bi.o
#   python3 gen_code.py > ../src/guest/code.rs   (then: cargo fmt -p minivm)
import re,subprocess,sys
def listing(obj, args, start=None, stop=None):
    cmd=["objdump","-d","-M",args,obj]
    if start is not None: cmd.append("--start-address=%d"%start)
    if stop is not None: cmd.append("--stop-address=%d"%stop)
    out=subprocess.check_output(cmd,text=True)
    lines=[]
    for l in out.splitlines():
        m=re.match(r"\s*([0-9a-f]+):\t([0-9a-f ]+?)\s*\t(.*)$",l)
        if m:
            lines.append((int(m.group(1),16),m.group(2).split(),re.sub(r"\s+"," ",m.group(3)).strip()))
        else:
            m2=re.match(r"\s*([0-9a-f]+):\t([0-9a-f ]+?)\s*$",l)
            if m2: lines.append((int(m2.group(1),16),m2.group(2).split(),""))
            m3=re.match(r"^[0-9a-f]+ <(\w+)>:",l)
            if m3: lines.append((None,None,m3.group(1)))
    return lines
def emit(lines):
    s=""
    for off,b,txt in lines:
        if off is None: s+="    // %s:\n"%txt; continue
        bs=" ".join("0x%s,"%x for x in b)
        s+="    %s // %04x: %s\n"%(bs,off,txt) if txt else "    %s // %04x\n"%(bs,off)
    return s
tg=listing("tg.o","intel")
bi=listing("bi.o","i8086,intel",0,0x1c)+[(0x1c,["ea","21","7c","08","00"],"jmp 0x08:0x7c21 (far, to pm)")]+listing("bi.o","intel",0x21,0x60)
data=open("bi.bin","rb").read()[0x60:]
bi_data=[(0x60,["%02x"%x for x in data[0:8]],"gdt[0]: null"),(0x68,["%02x"%x for x in data[8:16]],"gdt[1]: code 0x08, flat 4 GiB, 32-bit"),(0x70,["%02x"%x for x in data[16:24]],"gdt[2]: data 0x10, flat 4 GiB"),(0x78,["%02x"%x for x in data[24:30]],"gdt_desc: limit 23, base 0x7c60")]
print("//! Guest machine code, hand-assembled (listings kept as comments).")
print("// Generated from guest/testguest.S and guest/bootinc.S (listings kept as comments).")
print("// The bytes are checked in by hand: building needs no assembler.\n")
print("/// The ring-3 test guest program (see `guest/testguest.S`).\n#[rustfmt::skip]\npub const TEST_GUEST: &[u8] = &[\n"+emit(tg)+"];\n")
print("/// The boot-sector incrementer, without padding and signature (see `guest/bootinc.S`).\n#[rustfmt::skip]\npub const BOOT_INCREMENTER: &[u8] = &[\n"+emit(bi+bi_data)+"];")
