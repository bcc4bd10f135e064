# frozen_string_literal: true

require "rexml/document"
require "rbconfig"

# Runs a Ruby command under valgrind and reports only what concerns the extension:
# errors and definite/indirect leaks with a frame in flowctl.so. Ruby 3.1 does not free
# its heap at exit, so a plain valgrind run reports thousands of leaks that are not ours.
module FlowctlMemcheck
  SO = "flowctl.so"
  SUPPRESSIONS = File.expand_path("valgrind.supp", __dir__)

  Finding = Struct.new(:kind, :what, :stack)

  def self.run(ruby_args, xml: "tmp/memcheck.xml")
    FileUtils.mkdir_p(File.dirname(xml))
    cmd = ["valgrind", "--tool=memcheck", "--xml=yes", "--xml-file=#{xml}", "--leak-check=full",
           "--show-leak-kinds=definite,indirect", "--errors-for-leak-kinds=definite,indirect",
           "--num-callers=40", "--error-limit=no", "--trace-children=no", "--suppressions=#{SUPPRESSIONS}",
           RbConfig.ruby, *ruby_args]
    env = { "RUBY_FREE_MIN" => nil, "FLOWCTL_NO_COMPACTION" => "1", "FLOWCTL_MEMCHECK" => "1" }
    ok = system(env, *cmd)
    findings = parse(xml)
    report(findings)
    [ok, findings]
  end

  # Ruby's allocators, through which memory the extension owns is allocated.
  ALLOCATORS = /\A(ruby_x(m|c|re)alloc2?|rb_xmalloc_mul_add|rb_xrealloc_mul_add|rb_xcalloc_mul_add|rb_alloc_tmp_buffer.*)\z/

  def self.parse(xml)
    # one small document per <error>: a DOM of the whole file (90 MB for the suite) takes gigabytes
    File.read(xml).scan(%r{<error>.*?</error>}m).filter_map do |chunk|
      next unless chunk.include?(SO) # most records are Ruby's own: skip them before parsing
      err = REXML::Document.new(chunk).root
      kind = err.elements["kind"].text
      frames = err.get_elements("stack[1]/frame").map { |f| [f.elements["fn"]&.text, f.elements["obj"]&.text.to_s] }
      next unless ours?(kind, frames)

      what = err.elements["what"]&.text || err.elements["xwhat/text"]&.text
      Finding.new(kind, what, frames.map { |fn, obj| "#{fn || '???'} (#{File.basename(obj)})" })
    end
  end

  # Walks from the innermost frame outwards: an error is the extension's when a frame of
  # flowctl.so is reached before any named Ruby function other than an allocator. Memory
  # Ruby allocates for objects (newobj, strings, classes) belongs to Ruby's heap, which
  # Ruby 3.1 never frees at exit; uninitialised reads inside Ruby are its conservative GC.
  # gRPC core does its own deferred work (name resolution, TLS handshakes, timers) on whichever
  # thread polls or flushes its closures: memory allocated there, below our call into gRPC, is
  # gRPC's (objects alive at exit, c-ares' own leaks), not something flowctl asked for. What
  # flowctl creates (calls, channels, buffers) is allocated by the direct call and still counts.
  GRPC_POLLER = /\A(grpc_pollset_work|grpc_completion_queue_(pluck|next)|grpc_core::ExecCtx::Flush)/

  def self.ours?(kind, frames)
    leak = kind.start_with?("Leak")
    through_ruby = through_allocator = false
    frames.each_with_index do |(fn, obj), i|
      return false if leak && fn&.match?(GRPC_POLLER)
      return !through_ruby || through_allocator if obj.end_with?(SO)
      next if obj.include?("vgpreload") || (i.zero? && obj.include?("libc.so"))
      next unless obj.include?("libruby")
      return false unless leak
      return false if fn && !fn.match?(ALLOCATORS)

      through_ruby = true
      through_allocator ||= fn&.match?(ALLOCATORS)
    end
    false
  end

  def self.report(findings)
    if findings.empty?
      puts "memcheck: no errors and no leaks in #{SO}"
      return
    end
    findings.each do |f|
      puts "memcheck: #{f.kind}: #{f.what}"
      f.stack.first(15).each { |s| puts "    #{s}" }
    end
    puts "memcheck: #{findings.size} finding(s) in #{SO}"
  end
end
