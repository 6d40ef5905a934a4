"""Why CNN latency does not follow FLOPs at narrow widths on XLA:CPU: 3x3 convolutions at the
slimmable CNN's shapes (batch 32, configs/slimmable_dense.py:cnn) at w = 0.25 and w = 1,
by ``lax.conv_general_dilated`` and by an im2col of slices + one matmul ("cat").

    python experiments/bench/slim_conv.py

Prints ms per call (minimum of 30) and MFLOPs for each shape; compare the sums per width.
"""
import time, jax, jax.numpy as jnp, numpy as np
def conv(x,k,s=1): return jax.lax.conv_general_dilated(x,k,(s,s),"SAME",dimension_numbers=("NHWC","HWIO","NHWC"))
def cat(x,k,s=1):
    kh,kw,ci,co=k.shape
    H,W=x.shape[1:3]
    ph,pw=(kh-1)//2,(kw-1)//2
    if s==2: # SAME for stride 2 even input: pad (0,1)
        xp=jnp.pad(x,((0,0),(0,1),(0,1),(0,0))); Ho,Wo=H//2,W//2
        cols=[xp[:,i:i+2*Ho:2,j:j+2*Wo:2,:] for i in range(kh) for j in range(kw)]
    else:
        xp=jnp.pad(x,((0,0),(ph,ph),(pw,pw),(0,0)))
        cols=[xp[:,i:i+H,j:j+W,:] for i in range(kh) for j in range(kw)]
    p=jnp.concatenate(cols,-1)
    return p @ k.reshape(kh*kw*ci,co)
def t(f,*a,r=30):
    f=jax.jit(f,static_argnums=(2,)); f(*a).block_until_ready()
    best=1e9
    for _ in range(r):
        t0=time.perf_counter(); f(*a).block_until_ready(); best=min(best,time.perf_counter()-t0)
    return best*1e3
B = 32
tot={}
for hw,ci,co,s in [(32,1,4,1),(32,4,4,1),(32,4,8,2),(16,8,8,1),(16,8,16,2),(8,16,16,1),(8,16,4,1),(32,4,4,1),
                   (32,1,16,1),(32,16,16,1),(32,16,32,2),(16,32,32,1),(16,32,64,2),(8,64,64,1),(8,64,16,1),(32,16,16,1)]:
    x=jax.random.normal(jax.random.key(0),(B,hw,hw,ci)); k=jax.random.normal(jax.random.key(1),(3,3,ci,co))
    a,b=conv(x,k,s),cat(x,k,s)
    assert np.allclose(a,b,atol=1e-3), (hw,ci,co,s)
    tc,tk=t(conv,x,k,s),t(cat,x,k,s)
    print(hw,ci,co,s, "conv %.2f cat %.2f ms"%(tc,tk), "MFLOP %.1f"%(2*B*(hw//s)**2*9*ci*co/1e6), flush=True)
